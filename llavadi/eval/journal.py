"""Append-only journals of finished answers: a killed `eval` or `regenerate` resumes where it stopped.

A journal is a JSONL file beside the outputs: a header line saying what the answers depend on
(model files, question or data file, generation settings), then one line per finished answer,
appended, flushed and fsynced batch by batch as generation goes. A rerun with the same header
reuses every complete line (a line cut short by a kill is dropped) and generates only the rest;
a different header means other answers, so the journal starts afresh and says what changed.
The command's final outputs are written atomically from the answers; the journal is then deleted.
"""

from __future__ import annotations

import json
import os

from llavadi.atomic import fsync_dir

KIND = "llavadi-answer-journal"


class AnswerJournal:
    """Finished answers by key, persisted line by line in `path` under a `header` of settings."""

    def __init__(self, path: str | os.PathLike, header: dict, log=print) -> None:
        self.path = os.fspath(path)
        self.header = json.loads(json.dumps({"kind": KIND, **header}))  # as it reads back from the file
        self.log = log
        self._handle = None

    def load(self) -> dict[str, dict]:
        """The answers a previous run finished under the same header ({} otherwise); opens for appending."""
        records, keep_bytes = self._read()
        if records is None:
            self._start()
            return {}
        with open(self.path, "r+b") as f:  # drop a last line cut short by a kill
            f.truncate(keep_bytes)
            f.seek(keep_bytes - 1)
            if f.read(1) != b"\n":  # the header line itself lost its newline
                f.write(b"\n")
        self._handle = open(self.path, "a", encoding="utf-8")
        return records

    def _read(self) -> tuple[dict[str, dict] | None, int]:
        if not os.path.isfile(self.path):
            return None, 0
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            self.log(f"{self.path}: unreadable journal header; starting afresh")
            return None, 0
        if header != self.header:
            changed = sorted(k for k in set(header) | set(self.header) if header.get(k) != self.header.get(k))
            self.log(f"{self.path}: answers of another run ({', '.join(changed)} differ); starting afresh")
            return None, 0
        records, keep = {}, min(len(lines[0]) + 1, len(data))
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except ValueError:
                break  # the torn last line (or the empty string after the final newline)
            records[record["key"]] = record
            keep += len(line) + 1
        return records, min(keep, len(data))

    def _start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")
        self._handle.write(json.dumps(self.header) + "\n")
        self._sync()
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def append(self, records: list[dict]) -> None:
        """Persist finished answers (each with a `key`) before going on."""
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._sync()

    def _sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file (kept for a later rerun)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def discard(self) -> None:
        """Delete the journal once the final outputs are written."""
        self.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def journaled_answer_ids(bundle, questions, journal: AnswerJournal, keys: list[str], batch_size: int = 16,
                         max_new_tokens: int = 16, progress: bool = True, desc: str = "generating",
                         prompt_ids: list[list[int]] | None = None, shard=None) -> list[list[int]]:
    """`generate_answer_ids` for questions whose key the journal lacks; every answer's ids, in order.

    `shard` (data parallelism, llavadi.eval.parallel): the main process alone reads and appends the
    journal; every process learns what is done from it and gets every answer back.
    """
    from llavadi.eval.generate import generate_answer_ids
    from llavadi.eval.parallel import ONE_PROCESS

    shard = shard or ONE_PROCESS
    done = shard.broadcast(journal.load() if shard.is_main else None)
    todo = [i for i, k in enumerate(keys) if k not in done]
    if len(todo) < len(keys) and shard.is_main:
        journal.log(f"{desc}: {len(keys) - len(todo)} of {len(keys)} answers found in {journal.path}; "
                    f"generating the other {len(todo)}")

    def persist(batch_indices: list[int], answers: list[list[int]]) -> None:
        records = [{"key": keys[todo[i]], "ids": ids} for i, ids in zip(batch_indices, answers)]
        if shard.is_main:
            journal.append(records)
        done.update((r["key"], r) for r in records)

    try:
        if todo:
            generate_answer_ids(bundle, [questions[i] for i in todo], batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=progress, desc=desc,
                                prompt_ids=None if prompt_ids is None else [prompt_ids[i] for i in todo],
                                on_batch=persist, shard=shard)
    finally:
        journal.close()
    return [done[k]["ids"] for k in keys]
