-- Version 6 (SQLite): replies stream, and a message can be answered by a plan of agents.
--
-- reply_events: what a client streaming a reply sees (GET .../messages/<id>/stream), in order:
-- text pieces as the model produces them (token), the tools it called (tool_call) and their
-- results (tool_result), a new try after a failed one (restart: drop the text since the last
-- tool event), the end (done). ``id`` is the event id a client resumes after (Last-Event-ID);
-- one writer at a time per message (the reply's tasks run one after another), so a message's
-- ids grow in commit order.
CREATE TABLE reply_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL REFERENCES assistant_messages (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL,       -- JSON
    created_at  REAL NOT NULL
);
CREATE INDEX reply_events_message ON reply_events (message_id, id);

-- A plan answers a user message with agents: the planner's steps, each an agent (a session of
-- its own with a role prompt, and the step's instruction as its user message), all run as
-- tasks side by side, then a join task writes the answer. ``join_task``: that task.
CREATE TABLE assistant_plans (
    message_id  INTEGER PRIMARY KEY REFERENCES assistant_messages (id) ON DELETE CASCADE,
    planner     TEXT NOT NULL,       -- model or rules
    join_task   INTEGER,
    created_at  REAL NOT NULL
);
CREATE TABLE assistant_plan_steps (
    message_id        INTEGER NOT NULL REFERENCES assistant_plans (message_id) ON DELETE CASCADE,
    position          INTEGER NOT NULL,
    role              TEXT NOT NULL,
    instruction       TEXT NOT NULL,
    session_id        TEXT NOT NULL,   -- the agent's own session
    agent_message_id  INTEGER NOT NULL,
    task_id           INTEGER,
    PRIMARY KEY (message_id, position)
);
