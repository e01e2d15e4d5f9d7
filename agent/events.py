"""Every event name the runtime logs, with what it means: the one list `agentctl logs
--event` checks a name against and offers for completion.

An event name is a stable interface (alert rules and scripts filter on it), so a new one
is added here first; tests/test_events.py scans the package for `event(...)` calls and
fails on a name this list does not know. Cheap to import: the `logs` fast path uses it.
"""

EVENTS: dict[str, str] = {
    # the supervisor
    "supervisor.starting": "the supervisor begins (pid, config, log sink)",
    "supervisor.ready": "every worker initialized; READY=1 sent",
    "supervisor.failed": "the supervisor could not start or ended with an error",
    "supervisor.signal": "a signal arrived and what it does",
    "supervisor.stopping": "a graceful stop began",
    "supervisor.stopped": "the supervisor ended (its outcome)",
    "supervisor.shutdown.timeout": "a worker did not stop within stop_timeout",
    "supervisor.shutdown.forced": "a second signal or the deadline forced the stop",
    "supervisor.killed": "agentctl stop sent SIGKILL after the grace period",
    "supervisor.children.killed": "agent processes left over were killed",
    "supervisor.stale_state": "the previous run had crashed (its state file said live)",
    "supervisor.lock_lost": "agent.lock no longer names the supervisor's lock",
    "supervisor.lock_restored": "agent.lock names the supervisor's lock again",
    "supervisor.state.error": "the state file could not be written (disk full?)",
    "supervisor.state.recovered": "the state file is written again",
    "supervisor.insecure_file": "a secret file is readable by group or others",
    "supervisor.reloaded": "a reload applied a new config",
    "supervisor.reload.failed": "a reload was refused; the old config keeps running",
    # any worker
    "worker.started": "a worker initialized and runs",
    "worker.stopped": "a worker ended",
    "worker.error": "a worker failed (it is restarted with backoff)",
    "worker.restarting": "a failed worker is started again",
    "worker.hung": "a worker's heartbeat is older than hang_timeout",
    "worker.recovered": "a hung worker beats again",
    # the file queue
    "queue.poll": "inotify is unavailable; incoming/ is polled",
    "queue.error": "the queue met a file or directory it cannot handle",
    "queue.retry_later": "a message could not be claimed yet; retried after a delay",
    "queue.recovered": "messages claimed by a crashed run went back to incoming/",
    "queue.stalled": "messages wait and nothing is claimed (stall_timeout)",
    "queue.flowing": "a stalled queue moves again",
    "message.claimed": "a message left incoming/ for a run",
    "message.done": "the agent answered; the reply is in outgoing/",
    "message.retry": "a run failed; the message is tried again after a delay",
    "message.failed": "a message failed for good; it is in failed/ with a reason",
    "message.quarantined": "a file in incoming/ cannot be moved; skipped until restart",
    # the shared PostgreSQL queue ([queue] backend = "postgres", docs/scaling.md)
    "queue.db.down": "the queue database does not answer; incoming messages wait on disk",
    "queue.db.up": "the queue database answers again",
    "queue.db.kept": "a run's outcome was kept on this host: the queue database did not answer",
    "queue.db.flushed": "outcomes kept during an outage were written to the queue database",
    "queue.db.pool": "a warning of the database connection pool (rate-limited)",
    "queue.lease_lost": "this host's lease on a message was taken back; its run will not reply",
    "queue.lease_reclaimed": "an expired lease (of a dead or frozen host) was taken back",
    "message.ingested": "a local message was inserted into the shared queue",
    "message.lost": "a run ended after its message was taken over; its reply was dropped",
    # the dispatcher and the agent
    "dispatcher.error": "the dispatcher met an error outside a run",
    "dispatcher.orphans_killed": "agent processes of an earlier run were killed",
    "dispatcher.run_record_refused": "a run record was not trusted; nothing was killed",
    "agent.failing": "an agent's runs keep failing (the dispatcher is degraded)",
    "agent.recovered": "a failing agent answered again",
    "session.reset": "a conversation's agent session was forgotten",
    "session.unsaved": "an agent session could not be saved in the database",
    # the heartbeat
    "heartbeat.reply": "the agent answered the heartbeat",
    "heartbeat.missed": "a heartbeat got no reply in time",
    "heartbeat.error": "the heartbeat could not be sent",
    # Slack
    "slack.profile.running": "a Slack profile is connected",
    "slack.profile.connecting": "a Slack profile is connecting",
    "slack.profile.auth_missing": "a Slack profile has no token file",
    "slack.profile.auth_failed": "Slack refused a profile's token",
    "slack.profile.api_failure": "the Slack API failed for a profile",
    "slack.profile.disconnected": "a Slack profile lost its connection",
    "slack.message.enqueued": "a Slack message was queued for the agent",
    "slack.duplicate": "a Slack event already seen was dropped",
    "slack.unsupported": "a Slack interaction was answered 'not supported'",
    "slack.sender.denied": "a Slack sender is not allowed by the profile's policy",
    "slack.inbound.error": "a Slack event could not be handled",
    "slack.backfill": "missed Slack messages were fetched after a reconnect",
    "slack.backfill.failed": "fetching missed Slack messages failed",
    "slack.backfill.busy": "another host is backfilling a Slack channel; this one tries later",
    "slack.reply.posted": "a reply was posted to Slack",
    "slack.reply.elsewhere": "a reply was posted already (or is being posted by another host)",
    "slack.reply.retry": "posting a reply failed; tried again",
    "slack.reply.error": "posting a reply met an error",
    "slack.reply.failed": "a reply could not be posted for good",
    "slack.reply.failed_file": "a reply's file could not be uploaded",
    "slack.notice.posted": "a notice (failure, busy) was posted to Slack",
    "slack.feedback.failed": "a reaction or status could not be set",
    "slack.ratelimited": "Slack answered 429; the call waits",
    "slack.sdk": "a message of the Slack SDK itself",
    # Prometheus metrics ([metrics] listen)
    "metrics.error": "a scrape met an error; only that scrape or series is affected",
}


def is_known(name: str) -> bool:
    return name in EVENTS


def unknown_event_message(name: str) -> str:
    return f"unknown event '{name}'; expected one of: {', '.join(sorted(EVENTS))}"
