-- 0001: the shared queue of issue 12 (docs/scaling.md). Applied in one transaction under
-- the migration advisory lock by agent/pg/migrate.py, which records it in schema_migrations.

-- Every supervisor sharing the queue: registered at start, heartbeat while it runs.
CREATE TABLE hosts (
    host_id      text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    in_flight    integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    version      text
);

-- One row per message, for its whole life: queued -> running -> done | failed (running ->
-- queued again on a retry or an expired lease). Times are the database's now(), never a
-- host's clock.
CREATE TABLE messages (
    id               bigserial PRIMARY KEY,
    channel          text NOT NULL,
    message_id       text NOT NULL,
    conversation     text NOT NULL,  -- the lane key: one conversation runs in order, once
    agent            text,
    payload          jsonb NOT NULL,  -- the message as docs/queue.md defines it
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,  -- host_id holding the claim
    lease_expires_at timestamptz,
    reply            jsonb,
    reply_host       text,  -- the host whose reply was stored
    origin_host      text,  -- the producing host, for local producers waiting for the reply
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (channel, message_id),
    CHECK ((state = 'running') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((state = 'done') = (reply IS NOT NULL))
);

-- The claim: the head (lowest id) of each conversation among the unfinished messages.
CREATE INDEX messages_pending ON messages (conversation, id)
    WHERE state IN ('queued', 'running');
-- Ready messages in arrival order, and the cluster depth / oldest age.
CREATE INDEX messages_queued ON messages (id) WHERE state = 'queued';
-- Expired leases, and leases per host.
CREATE INDEX messages_leases ON messages (lease_expires_at) WHERE state = 'running';
CREATE INDEX messages_lease_owner ON messages (lease_owner) WHERE state = 'running';
-- Local producers waiting for their replies.
CREATE INDEX messages_origin_done ON messages (origin_host, finished_at)
    WHERE origin_host IS NOT NULL AND state IN ('done', 'failed');

-- Slack: envelopes already taken in by some host (Socket Mode may deliver one to two).
CREATE TABLE slack_events (
    profile     text NOT NULL,
    event_id    text NOT NULL,
    host_id     text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (profile, event_id)
);
CREATE INDEX slack_events_received ON slack_events (received_at);

-- Slack: per channel, the newest ts enqueued and the cursor pinned before a backfill,
-- with the threads followed (agent/slack_cursors.py's protocol, shared).
CREATE TABLE slack_cursors (
    profile    text NOT NULL,
    channel    text NOT NULL,
    cursor_ts  text,
    pinned_ts  text,
    threads    jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (profile, channel)
);

-- Slack: a reply is posted by one host only (a claim with a lease), and once.
CREATE TABLE slack_posts (
    message     bigint PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    claimed_by  text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    parts_posted integer NOT NULL DEFAULT 0,
    posted_at   timestamptz,
    slack_ts    text
);

-- Agent CLI sessions continuing conversations (agent/sessions.py's map, shared).
CREATE TABLE sessions (
    agent        text NOT NULL,
    conversation text NOT NULL,
    session_id   text NOT NULL,
    host_id      text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, conversation)
);
