-- Version 5 (SQLite): the assistant calls tools. A reply may take steps before its answer:
-- an assistant message asking for tools (tool_calls, JSON) and a tool message per call with
-- its result; both belong to the user message they work on (step_of), never to the history
-- of later turns. ``workflow``: the tools' workflow, once submitted.

ALTER TABLE assistant_messages ADD COLUMN step_of INTEGER;
ALTER TABLE assistant_messages ADD COLUMN tool_calls TEXT;
ALTER TABLE assistant_messages ADD COLUMN tool_call_id TEXT;
ALTER TABLE assistant_messages ADD COLUMN workflow INTEGER;
CREATE UNIQUE INDEX assistant_messages_tool_result ON assistant_messages (step_of, tool_call_id);
