"""Evaluation: answer a held-out split and score the answers.

The split is the one training held out: `load_splits` on the checkpoint's saved dataset config (same files, same
seed), narrowed to the `val_keys` of the checkpoint's `data_manifest.json` when it has one; a data file whose size
or sha256 differs from the manifest (without a manifest: modified after the checkpoint was written) is named in
a warning, since the split may then differ from training's. Or the `dataset.val` files given on the command line.

Scores: exact match (stripped strings), ROUGE-L F1 (the `rouge-score` library, with a tokenizer that keeps CJK
characters: one token per character, lowercase alphanumeric words otherwise; rouge-score's own tokenizer drops
every CJK character) and, for rows whose reference holds `<box>` coordinates, the IoU of the reply's boxes
against the reference's (paired in order; a missing box counts 0) and the share with IoU >= 0.5. The reference
is the response as trained on: grounding placeholders filled. A reply or reference with a thinking block
(`<think>...</think>`, InternVL3.5 with `model.thinking`) is scored by the answer after its last `</think>`; the
result rows keep the whole reply.

Output: `<result_dir>/<time>.jsonl`, one row per record (`system`, `query`, `history`, `response`, `label`,
`images`, `videos`, `source`, `line`, and `error` for a record that could not be encoded), written batch by batch
as the answers come, before any scoring; then `<time>_summary.json` with the scores. A reply whose box cannot be
read (`<box>[[12.5.3, 7]]</box>`) scores 0 for that box; it never stops the evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from vltrain.data.records import Record, RecordError
from vltrain.files import write_atomic
from vltrain.infer.engine import Conversation, Engine, exact_match, reference_text
from vltrain.manifest import MANIFEST_FILE, RUN_CONFIG, files_changed
from vltrain.progress import progress

log = logging.getLogger(__name__)


# CJK ideographs, kana and hangul: one token each (ROUGE over Chinese text is computed per character).
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}_]+")
_BOX = re.compile(r"<box>\s*\[(.*?)\]\s*</box>", re.S)
_INNER = re.compile(r"\[([^\[\]]*)\]")  # each [x1, y1, x2, y2] of a box block


class CJKTokenizer:
    """rouge-score tokenizer: one token per CJK character, lowercase alphanumeric words otherwise."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())
    return [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]


def parse_boxes(text: str) -> list[tuple[float, float, float, float] | None]:
    """Every `[x1, y1, x2, y2]` inside `<box>...</box>` blocks of `text`, in order; None for one that is not four
    finite numbers (a model's reply can hold `[12.5.3, 7]`): it keeps its place and scores 0."""
    boxes: list[tuple[float, float, float, float] | None] = []
    for block in _BOX.findall(text):
        for inner in _INNER.findall(block):
            try:
                values = tuple(float(v) for v in inner.split(","))
            except ValueError:
                values = ()
            boxes.append(values if len(values) == 4 and all(math.isfinite(v) for v in values) else None)
    return boxes


def box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_iou(answer: str, reference: str) -> float | None:
    """Mean IoU of the reply's boxes with the reference's, paired in order (None: no box in the reference)."""
    truth = parse_boxes(reference)
    if not truth:
        return None
    found = parse_boxes(answer)
    return sum(box_iou(t, found[i]) if i < len(found) else 0.0 for i, t in enumerate(truth)) / len(truth)


def _row_iou(answer: str, reference: str) -> float | None:
    """`grounding_iou` of one row; a row whose boxes cannot be scored counts 0 (logged) rather than ending the
    evaluation whose answers are already written."""
    try:
        return grounding_iou(answer, reference)
    except Exception as e:  # noqa: BLE001 - one unscorable reply must not lose the others' scores
        log.warning("grounding of a reply could not be scored (%s: %s); it counts 0: %r", type(e).__name__, e,
                    answer[:200])
        return 0.0


def final_answer(text: str) -> str:
    """The answer after the last `</think>` (the whole text when it has none)."""
    return text.rsplit("</think>", 1)[-1].strip()


def score(answers: list[str], references: list[str]) -> dict[str, float]:
    """exact_match, rouge_l and, when some references hold boxes, grounding_iou / grounding_acc@0.5, all on the
    final answers (`final_answer`)."""
    answers, references = [final_answer(a) for a in answers], [final_answer(r) for r in references]
    metrics = {"rows": len(references), "exact_match": exact_match(answers, references)}
    rouge = rouge_l(answers, references)
    metrics["rouge_l"] = sum(rouge) / len(rouge) if rouge else 0.0
    ious = [v for v in (_row_iou(a, r) for a, r in zip(answers, references)) if v is not None]
    if ious:
        metrics |= {"grounding_rows": len(ious), "grounding_iou": sum(ious) / len(ious),
                    "grounding_acc@0.5": sum(v >= 0.5 for v in ious) / len(ious)}
    return metrics


# ---- the held-out split ---------------------------------------------------------------------------------------


def _local_files(dataset) -> list[Path]:
    """The data files of the dataset specs (`path#N` -> path; hub names are no files)."""
    paths = [Path(spec.rsplit("#", 1)[0]) for spec in [*dataset.train, *dataset.val]]
    return [p for p in paths if p.is_file()]


def held_out_records(cfg, ckpt_dir: Path | None = None) -> list[Record]:
    """The records training held out (see the module docstring); rows that no longer parse are logged."""
    from vltrain.data.specs import load_splits

    manifest = None
    if ckpt_dir is not None and (Path(ckpt_dir) / MANIFEST_FILE).is_file():
        manifest = json.loads((Path(ckpt_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
        changes = files_changed(manifest)
    elif ckpt_dir is not None and (Path(ckpt_dir) / RUN_CONFIG).is_file():
        # no manifest (older checkpoints): a data file modified after the checkpoint was written is suspect
        written = (Path(ckpt_dir) / RUN_CONFIG).stat().st_mtime
        changes = [f"{path}: modified after the checkpoint was written" for path in _local_files(cfg.dataset)
                   if path.stat().st_mtime > written]
    else:
        changes = []
    if changes:
        log.warning("the data files changed since training; the held-out split may differ from the one "
                    "training used:\n  %s", "\n  ".join(changes))
    errors: list[RecordError] = []
    _, val = load_splits(cfg.dataset, errors=errors)
    for e in errors:
        log.warning("row left out: %s", e)
    if manifest and manifest.get("val_keys") is not None:
        keys = {(str(Path(s).resolve()), int(r)) for s, r in manifest["val_keys"]}
        found = [r for r in val if (str(Path(r.key[0]).resolve()), r.key[1]) in keys]
        if len(found) != len(keys):
            log.warning("%d of the %d held-out rows named in %s were not found in the data files now",
                        len(keys) - len(found), len(keys), MANIFEST_FILE)
        val = found
    return val


# ---- evaluation -----------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict
    result_file: Path
    summary_file: Path


def evaluate(engine: Engine, records: list[Record], result_dir: Path, batch_size: int = 8,
             limit: int | None = None, **generation) -> EvalResult:
    """Answer `records` (the first `limit`), writing each batch's rows to the result file as soon as they are
    answered (flushed to disk), so an evaluation stopped part way (out of memory, Ctrl-C, a scoring bug) keeps
    every answer it computed; then score the answers and write the summary."""
    records = records[:limit] if limit else records
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    result_file, stamp = _new_result_file(result_dir)
    answers, references, failed = [], [], 0
    starts = range(0, len(records), batch_size)
    with result_file.open("w", encoding="utf-8") as out:
        for start in progress(starts, len(starts), desc="generating", unit="batch"):
            chunk = records[start:start + batch_size]
            prepared = [_prepare(engine, r) for r in chunk]
            good = [r for r, (_, error) in zip(chunk, prepared) if error is None]
            replies = iter(engine.generate([Conversation.from_record(r) for r in good], batch_size=batch_size,
                                           **generation) if good else [])
            for r, (reference, error) in zip(chunk, prepared):
                row = {"system": r.system, "query": r.query, "history": [list(p) for p in r.history],
                       "response": None, "label": r.response, "images": r.images, "videos": r.videos,
                       "source": r.source, "line": r.line}
                if error is None:
                    row["response"], row["label"] = next(replies), reference
                    answers.append(row["response"])
                    references.append(reference)
                else:
                    row["error"] = error
                    failed += 1
                    log.warning("not answered: %s", error)
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
    metrics = score(answers, references)
    metrics["failed_rows"] = failed
    summary_file = result_dir / f"{stamp}_summary.json"
    write_atomic(summary_file, json.dumps({**metrics, "result_file": str(result_file)}, indent=2) + "\n")
    return EvalResult(metrics, result_file, summary_file)


def _prepare(engine: Engine, record: Record) -> tuple[str | None, str | None]:
    """(reference, None), or (None, the problem) for a record that cannot be encoded (an unreadable image, too
    long...): encoded once here to set those rows apart before generating."""
    try:
        reference = reference_text(record, engine.encoder)
        engine.encoder(record, for_generation=True, normalise=False)
        return reference, None
    except RecordError as e:
        return None, str(e)


def _new_result_file(result_dir: Path) -> tuple[Path, str]:
    """`<time>.jsonl` in `result_dir`, created now; `<time>-2.jsonl`, ... when an evaluation of the same second
    already wrote one (never overwritten)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        name = stamp if n == 1 else f"{stamp}-{n}"
        try:
            (result_dir / f"{name}.jsonl").open("x").close()
            return result_dir / f"{name}.jsonl", name
        except FileExistsError:
            continue
    raise FileExistsError(f"{result_dir}: no free result file name for {stamp}")
