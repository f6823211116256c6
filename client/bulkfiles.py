"""Files for ``embedserve bulk``: reading .txt/.jsonl inputs, writing .npy/.jsonl outputs,
and resuming an interrupted run where it stopped.

Resume points:
- .jsonl output: the number of complete lines (a torn last line is cut off).
- .npy output: a memory-mapped array of the final shape plus ``<output>.progress.json``,
  written after each flushed message, that records how many rows are done.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.client.aio import BulkItem

Writer = Callable[[list[BulkItem]], None]


def count_inputs(path: Path) -> int:
    jsonl = path.suffix == ".jsonl"
    count = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not jsonl or line.strip():
                count += 1
    return count


class BulkJob:
    def __init__(self, input_path: Path, output: Path, *, field: str, id_field: str) -> None:
        if input_path.suffix not in {".txt", ".jsonl"}:
            raise SystemExit(f"--input {input_path}: expected a .txt or .jsonl file")
        if output.suffix not in {".npy", ".jsonl"}:
            raise SystemExit(f"--output {output}: expected a .npy or .jsonl file")
        self.input = input_path
        self.output = output
        self.output_kind = output.suffix.removeprefix(".")
        self.field = field
        self.id_field = id_field
        self.sidecar = output.with_name(output.name + ".progress.json")
        self._ids: deque[Any] = deque()

    # -- where to start ----------------------------------------------------------------

    def start_fresh(self, total: int) -> int:
        self.output.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)
        self._total = total
        return 0

    def resume_point(self, total: int) -> int:
        self._total = total
        if self.output_kind == "jsonl":
            return self._resume_jsonl(total)
        if not self.sidecar.exists():
            if self.output.exists():
                raise SystemExit(f"cannot resume {self.output}: {self.sidecar.name} is missing")
            return 0
        progress = json.loads(self.sidecar.read_text(encoding="utf-8"))
        if progress.get("total") != total or progress.get("input") != str(self.input):
            raise SystemExit(
                f"cannot resume {self.output}: it was written for another input "
                f"({progress.get('input')}, {progress.get('total')} items)"
            )
        return int(progress["done"])

    def _resume_jsonl(self, total: int) -> int:
        if not self.output.exists():
            return 0
        with self.output.open("rb+") as handle:
            data = handle.read()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                handle.truncate(complete)  # a line torn by the interruption
        done = data[:complete].count(b"\n")
        if done > total:
            raise SystemExit(f"cannot resume {self.output}: it has more lines than the input")
        return done

    # -- reading -----------------------------------------------------------------------

    def texts(self, *, skip: int) -> Iterator[str]:
        """The texts from position ``skip`` on; their ids queue up for the writer."""
        jsonl = self.input.suffix == ".jsonl"
        position = 0
        with self.input.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if jsonl and not line.strip():
                    continue
                if position < skip:
                    position += 1
                    continue
                if jsonl:
                    record = json.loads(line)
                    if self.field not in record:
                        raise SystemExit(f"{self.input}:{line_number}: no field {self.field!r}")
                    text = str(record[self.field])
                    self._ids.append(record.get(self.id_field, position))
                else:
                    text = line.rstrip("\n").removesuffix("\r")
                    self._ids.append(position)
                position += 1
                yield text

    # -- writing -----------------------------------------------------------------------

    @contextmanager
    def writer(self, start: int) -> Iterator[Writer]:
        if self.output_kind == "jsonl":
            with self.output.open("a", encoding="utf-8") as handle:

                def write_jsonl(chunk: list[BulkItem]) -> None:
                    for item in chunk:
                        handle.write(json.dumps(self._record(item)) + "\n")
                    handle.flush()

                yield write_jsonl
            return
        state: dict[str, Any] = {"array": None, "done": start}

        def write_npy(chunk: list[BulkItem]) -> None:
            vectors = np.stack([item.vector for item in chunk if item.vector is not None])
            array = state["array"]
            if array is None:
                array = state["array"] = self._open_array(start, vectors.shape[1])
            first = state["done"]
            array[first : first + len(chunk)] = vectors
            array.flush()
            state["done"] = first + len(chunk)
            self._save_progress(state["done"], vectors.shape[1])
            for _ in chunk:
                self._ids.popleft()

        yield write_npy

    def _record(self, item: BulkItem) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self._ids.popleft()}
        if item.error is not None:
            record["error"] = {
                "code": item.error.code.name,
                "message": item.error.message,
                "violations": [v.__dict__ for v in item.error.violations],
            }
        else:
            assert item.vector is not None
            record["embedding"] = item.vector.tolist()
        return record

    def _open_array(self, start: int, dimensions: int) -> np.memmap[Any, Any]:
        if start > 0 and self.output.exists():
            array: np.memmap[Any, Any] = np.lib.format.open_memmap(self.output, mode="r+")
            if array.shape != (self._total, dimensions):
                raise SystemExit(f"cannot resume {self.output}: shape {array.shape} differs")
            return array
        return np.lib.format.open_memmap(
            self.output, mode="w+", dtype=np.float32, shape=(self._total, dimensions)
        )

    def _save_progress(self, done: int, dimensions: int) -> None:
        progress = {
            "input": str(self.input),
            "total": self._total,
            "done": done,
            "dimensions": dimensions,
            "complete": done == self._total,
        }
        temporary = self.sidecar.with_suffix(".tmp")
        temporary.write_text(json.dumps(progress), encoding="utf-8")
        os.replace(temporary, self.sidecar)
