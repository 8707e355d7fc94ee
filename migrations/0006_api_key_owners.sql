-- API keys with owners, the day each was last used, and revocation that
-- every serving process learns within a second (centime/auth.py).
--
-- owner_ids: NULL, the key sees every owner's wallets (the keys made before
-- this migration); else 1..100 owner ids, each 1..128 characters like
-- wallets.owner_id, and the key sees only those owners' wallets.
CREATE FUNCTION api_key_owner_ids_valid(owner_ids text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT cardinality(owner_ids) BETWEEN 1 AND 100
       AND array_ndims(owner_ids) = 1
       AND NOT EXISTS (
           SELECT 1 FROM unnest(owner_ids) AS o(owner_id)
            WHERE owner_id IS NULL OR length(owner_id) NOT BETWEEN 1 AND 128
       )
$$;

ALTER TABLE api_keys
    ADD COLUMN owner_ids text[] CHECK (owner_ids IS NULL OR api_key_owner_ids_valid(owner_ids)),
    -- Written at most once a day per key and serving process, not per request.
    ADD COLUMN last_used_on date;

-- Each serving process asks every half second for the keys revoked lately.
CREATE INDEX api_keys_revoked_at ON api_keys (revoked_at) WHERE revoked_at IS NOT NULL;

-- The processes cache keys and trust that a key never changes but to be
-- revoked, once, and is never deleted (a deleted key would stay usable in
-- their caches, unseen by the revocation poll): the database holds them to it.
CREATE FUNCTION api_keys_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'API keys are revoked, not deleted (key %)', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id
       OR NEW.scope IS DISTINCT FROM OLD.scope
       OR NEW.key_sha256 IS DISTINCT FROM OLD.key_sha256
       OR NEW.owner_ids IS DISTINCT FROM OLD.owner_ids
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR (OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at) THEN
        RAISE EXCEPTION 'an API key changes only by being revoked, once (key %)', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER api_keys_immutable BEFORE UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_refuse_change();
