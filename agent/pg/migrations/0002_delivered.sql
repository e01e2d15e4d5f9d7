-- 0002: replies handed to their local producer (docs/scaling.md, "Replies to local
-- producers"). The origin host writes each done / failed message of its own producers into
-- its queue/outgoing/ or failed/, then sets delivered_at; until then the row is pending
-- for it. Additive: a host of the previous release ignores the column.
ALTER TABLE messages ADD COLUMN delivered_at timestamptz;

CREATE INDEX messages_undelivered ON messages (origin_host, id)
    WHERE origin_host IS NOT NULL AND state IN ('done', 'failed') AND delivered_at IS NULL;
