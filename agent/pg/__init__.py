"""The shared PostgreSQL queue (issue 12, docs/scaling.md): many supervisors, one database.

  connect.py     where the database is (dsn_file / dsn), the pool, errors without secrets
  migrate.py     the versioned schema (migrations/NNNN_name.sql) applied under a lock
  queue.py       every queue statement: enqueue, claim, renew, complete, retry, reclaim
  dbstatus.py    `agentctl db status` / `db migrate`
  slackstore.py  the Slack worker's memory shared by hosts: dedupe, cursors, routes, claims
  sessions.py    the session map (conversation -> agent CLI session) shared by hosts

Nothing here is imported unless [queue] backend = "postgres" or `agentctl db` asks for it:
psycopg is an optional dependency (agent[postgres]).
"""
