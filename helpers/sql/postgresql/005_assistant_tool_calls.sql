-- Version 5 (PostgreSQL): the same columns as sqlite/005_assistant_tool_calls.sql.

ALTER TABLE assistant_messages ADD COLUMN step_of bigint;
ALTER TABLE assistant_messages ADD COLUMN tool_calls text;
ALTER TABLE assistant_messages ADD COLUMN tool_call_id text;
ALTER TABLE assistant_messages ADD COLUMN workflow bigint;
CREATE UNIQUE INDEX assistant_messages_tool_result ON assistant_messages (step_of, tool_call_id);
