-- pgreact schema, version 2.
-- Suspects (deliveries that failed or were abandoned before) are rare, and every claim looks for
-- one: without an index of their own that look scanned the handler's whole backlog (O(queue)
-- per claim), and the planner's estimate of that scan was high enough to JIT-compile every claim.
CREATE INDEX queue_suspect ON __SCHEMA__.queue (handler, id)
    WHERE dead_at IS NULL AND last_error IS NOT NULL;
