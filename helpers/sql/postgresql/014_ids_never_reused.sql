-- Version 14 (PostgreSQL): nothing to do. Its ids come from identity columns (sequences), which
-- never give an id twice; SQLite's migration of the same number makes its tables do the same.
SELECT 1;
