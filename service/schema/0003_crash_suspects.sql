-- pgreact schema, version 3.
-- Crash suspects (deliveries whose process died while handling them) apart from deliveries
-- whose handler raised: only crash suspects need to run one per process, so that a crash is
-- charged to nothing else (see the reaper in store.py). Retries of ordinary failures ride the
-- normal claims, and no longer queue for that one slot.
ALTER TABLE __SCHEMA__.queue ADD COLUMN crashed boolean NOT NULL DEFAULT false;
-- What version 2 marked abandoned is a crash suspect.
UPDATE __SCHEMA__.queue SET crashed = true
    WHERE dead_at IS NULL AND starts_with(last_error, 'claim abandoned:');
-- Crash suspects are rare, and every claim looks for one: an index of their own keeps that
-- look from scanning the handler's whole backlog (see version 2). queue_suspect stays, small as
-- it is, for the version-2 daemons still running during a rollout (or after a rollback).
CREATE INDEX queue_crashed ON __SCHEMA__.queue (handler, id) WHERE dead_at IS NULL AND crashed;
