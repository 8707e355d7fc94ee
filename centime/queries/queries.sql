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
INSERT INTO api_keys (id, name, scope, key_sha256) VALUES ($1, $2, $3, $4)

-- name: api_key_by_hash
SELECT id, name, scope FROM api_keys WHERE key_sha256 = $1 AND revoked_at IS NULL
