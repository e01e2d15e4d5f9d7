-- 0002: the Slack worker's shared memory across hosts (docs/scaling.md, "Slack across hosts"),
-- used by agent/pg/slackstore.py. Additive: 0001's tables stay as they are. slack_posts
-- (0001) is keyed by messages.id, which a Slack message queued in a host's file queue does
-- not have; replies are claimed here by the Slack messageId instead, whatever the queue.

-- Where the reply to a Slack message goes: the route slack_store.ProfileStore keeps in a
-- file per message (routes/<id>.json), shared, so any host can post the reply.
CREATE TABLE slack_routes (
    profile    text NOT NULL,
    message_id text NOT NULL,  -- the queue messageId, <profile>.<channel>.<ts>
    channel    text NOT NULL,
    thread_ts  text NOT NULL,
    fields     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- message_ts, parts_posted, progress_ts...
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (profile, message_id)
);
CREATE INDEX slack_routes_created ON slack_routes (created_at);

-- One host posts a reply: an insert-if-absent claim with a lease before the first post,
-- the posted ts recorded after it. A row with posted_at set is never posted again.
CREATE TABLE slack_reply_posts (
    profile          text NOT NULL,
    message_id       text NOT NULL,
    claimed_by       text NOT NULL,
    claimed_at       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    posted_at        timestamptz,
    slack_ts         text,
    PRIMARY KEY (profile, message_id)
);
CREATE INDEX slack_reply_posts_claimed ON slack_reply_posts (claimed_at);
