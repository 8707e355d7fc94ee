-- Queries of the composition root: migrations and API keys.

-- name: migrations_lock
-- Held for the whole run, so two `centime migrate` at once apply each file once.
SELECT pg_advisory_lock(hashtext('centime.migrate'))

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtext('centime.migrate'))

-- name: migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_applied
SELECT version, name, sha256 FROM schema_migrations ORDER BY version

-- name: migration_record
INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)

-- name: api_key_insert
INSERT INTO api_keys (id, name, scope, key_sha256, owner_ids)
VALUES ($1, $2, $3, $4, $5)
RETURNING created_at

-- name: api_key_by_hash
SELECT id, name, scope, owner_ids, last_used_on
  FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL

-- name: api_keys_recently_used
-- What a starting process caches before its first request.
SELECT key_sha256, id, name, scope, owner_ids, last_used_on
  FROM api_keys
 WHERE revoked_at IS NULL AND last_used_on >= $1
 ORDER BY last_used_on DESC
 LIMIT $2

-- name: api_keys_revoked_since
-- The keys revoked since $1 (the previous poll's time; now() on the first)
-- less an overlap $3, at most $2 of them, and this poll's time.
SELECT now() AS polled_at,
       array(SELECT key_sha256 FROM api_keys
              WHERE revoked_at >= coalesce($1::timestamptz, now()) - $3::interval
              ORDER BY revoked_at LIMIT $2) AS revoked

-- name: api_key_used_on
UPDATE api_keys SET last_used_on = $2
 WHERE id = $1 AND (last_used_on IS NULL OR last_used_on < $2)

-- name: api_key_revoke
-- clock_timestamp, not now(): the poll's window is measured from the time
-- the revocation is written.
UPDATE api_keys SET revoked_at = clock_timestamp()
 WHERE id = $1 AND revoked_at IS NULL
RETURNING revoked_at

-- name: api_key_by_id
SELECT id, name, scope, owner_ids, created_at, last_used_on, revoked_at FROM api_keys WHERE id = $1

-- name: api_keys_page
SELECT id, name, scope, owner_ids, created_at, last_used_on, revoked_at
  FROM api_keys
 WHERE ($1::uuid IS NULL OR id > $1::uuid)
 ORDER BY id
 LIMIT $2
