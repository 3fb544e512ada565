"""The lineage store: every run, iteration and candidate, kept with its fate.

`LineageStore` is the only way trusted code reads or writes the lineage database. It
hands out frozen views (pipeline/store/views.py), never live ORM objects, and every
call is one short transaction.

The same code serves the embedded default (a SQLite file) and the deployment
(PostgreSQL); the schema comes from the Alembic migrations in the top-level migrations/
(pipeline/store/schema.py).
"""
from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, defer, sessionmaker

from pipeline.store.errors import StoreError, UnknownCandidate, UnknownRun
from pipeline.store.models import (CANDIDATE_STATUSES, ITERATION_STAGES,
                                   OPEN_STATUSES, ROLES, RUN_STATUSES, RUN_TERMINAL_STATUSES,
                                   TERMINAL_STATUSES, Candidate, Evaluation, Iteration,
                                   MetricCurve, Run, utcnow)
from pipeline.store.schema import make_engine, require_current, upgrade_schema
from pipeline.store.views import (CandidateView, CurveView, EvaluationView, IterationView,
                                  RunView, view)
from pipeline.store.values import (ITERATION_FIELDS, arm_name, bound_logs, bound_reason, candidate_key,
                                   check, finite, floats, iteration_values, text)
from pipeline.text import first_line

MIN_PREFIX = 4   # shortest run id prefix accepted where a full id is expected

# -------------------------------------------------------------------------- store

class LineageStore:
    """The one API of the lineage database.

    `LineageStore(url)` opens a database whose schema is at the newest revision and
    never writes on its own: an older (or empty, or missing) one raises SchemaOutOfDate,
    whose message says to run `selfprog-cli db upgrade`. `LineageStore(url, create=True)`
    creates or upgrades it first (`launch` and the coordinator, which write runs).
    `LineageStore(url, read_only=True)` reads through connections the database itself
    keeps read-only (pipeline/store/schema.py `make_engine`): the web view.
    """

    def __init__(self, url: str, *, create: bool = False, read_only: bool = False) -> None:
        if create and read_only:
            raise ValueError("a read-only store cannot create its database")
        self.url = url
        self.engine = make_engine(url, create_file=create, read_only=read_only)
        self._shown = self.engine.url.render_as_string(hide_password=True)
        # expire_on_commit=False: views are built after commit without a reload.
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if create:
                upgrade_schema(self.engine)
            else:
                require_current(self.engine, self._shown)
        except (SQLAlchemyError, CommandError) as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open database {self._shown}: {first_line(exc)}") from None
        except StoreError:
            self.engine.dispose()
            raise

    # Closing matters for tests and short-lived CLI calls: it releases pooled
    # connections (PostgreSQL) and file handles (SQLite).
    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "LineageStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LineageStore({self._shown!r})"

    def _session(self) -> Session:
        return self._sessions()

    # ---------------------------------------------------------------- runs

    def create_run(self, *, config: dict, task: str, preset: str, seed: int) -> str:
        with self._session() as s, s.begin():
            run = Run(config=dict(config), task=task, preset=preset, seed=int(seed),
                      status="pending")
            s.add(run)
            s.flush()
            return run.id

    def _run_id(self, s: Session, run_id: str) -> str:
        """The full id of a run given its id or a unique prefix of at least 4 characters."""
        run_id = str(run_id).strip()
        if s.get(Run, run_id) is not None:
            return run_id
        if len(run_id) >= MIN_PREFIX:
            ids = s.scalars(select(Run.id).where(Run.id.startswith(run_id, autoescape=True))
                            .limit(2)).all()
            if len(ids) == 1:
                return ids[0]
            if len(ids) > 1:
                raise UnknownRun(f"run id prefix {run_id!r} is ambiguous; give more characters")
        raise UnknownRun(f"unknown run {run_id!r}")

    def get_run(self, run_id: str) -> RunView:
        with self._session() as s:
            return view(RunView, s.get(Run, self._run_id(s, run_id)))

    def list_runs(self, limit: int = 50) -> list[RunView]:
        with self._session() as s:
            rows = s.scalars(select(Run).order_by(Run.created_at.desc(), Run.id.desc())
                             .limit(limit)).all()
            return [view(RunView, r) for r in rows]

    def set_run_status(self, run_id: str, status: str, error: str | None = None, *,
                       only_from: tuple[str, ...] | None = None) -> bool:
        """Set the run's status; with `only_from`, only when it is one of those now (a
        compare-and-set: a stage failing after a cancel must not turn it into `failed`).
        Returns whether it was set."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self._session() as s, s.begin():
            run = s.get(Run, self._run_id(s, run_id), with_for_update=only_from is not None)
            if only_from is not None and run.status not in only_from:
                return False
            run.status = status
            run.error = text(error) if error is not None else None
            # A resumed run (back to running) is no longer finished.
            run.finished_at = utcnow() if status in RUN_TERMINAL_STATUSES else None
            return True

    # ---------------------------------------------------------- iterations

    def _iteration_row(self, s: Session, run_id: str, index: int, arm: str) -> Iteration | None:
        return s.scalars(select(Iteration).where(
            Iteration.run_id == run_id, Iteration.arm == arm, Iteration.index == index)).first()

    def ensure_iteration(self, run_id: str, index: int, *, source_in: str,
                         arm: str = "lm") -> IterationView:
        arm_name(arm)
        with self._session() as s:
            run_id = self._run_id(s, run_id)
            row = self._iteration_row(s, run_id, index, arm)
            if row is not None:
                return view(IterationView, row)
            row = Iteration(run_id=run_id, index=int(index), arm=arm, stage="pending",
                            source_in=text(source_in), lm_losses=[])
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                # Another worker created it between our read and our insert.
                s.rollback()
                row = self._iteration_row(s, run_id, index, arm)
                if row is None:
                    raise
            return view(IterationView, row)

    def get_iteration(self, run_id: str, index: int, arm: str = "lm") -> IterationView | None:
        with self._session() as s:
            row = self._iteration_row(s, self._run_id(s, run_id), index, arm)
            return None if row is None else view(IterationView, row)

    def iterations(self, run_id: str, arm: str | None = None) -> list[IterationView]:
        with self._session() as s:
            q = select(Iteration).where(Iteration.run_id == self._run_id(s, run_id))
            if arm is not None:
                q = q.where(Iteration.arm == arm)
            rows = s.scalars(q.order_by(Iteration.arm, Iteration.index)).all()
            return [view(IterationView, r) for r in rows]

    def update_iteration(self, run_id: str, index: int, arm: str = "lm", **fields: Any) -> None:
        fields = iteration_values(fields, ITERATION_FIELDS)
        with self._session() as s, s.begin():
            run_id = self._run_id(s, run_id)
            row = self._iteration_row(s, run_id, index, arm)
            if row is None:
                raise StoreError(f"run {run_id} has no iteration {index} (arm {arm})")
            for name, value in fields.items():
                setattr(row, name, value)

    def advance_stage(self, run_id: str, index: int, arm: str, from_stage: str | tuple[str, ...],
                      to_stage: str, **fields: Any) -> bool:
        """Move an iteration from `from_stage` (one stage or several) to `to_stage`, once.

        An atomic compare-and-set: the stage test is in the UPDATE itself, so of two
        concurrent or repeated callers (a task delivered twice) exactly one gets True;
        the others change nothing. `fields` (as for `update_iteration`) are written in
        the same statement, so they land only with the winning transition.
        """
        sources = (from_stage,) if isinstance(from_stage, str) else tuple(from_stage)
        for stage in sources:
            check(stage, ITERATION_STAGES, "iteration stage")
        fields = iteration_values(fields, ITERATION_FIELDS - {"stage"}, to_stage=to_stage)
        with self._session() as s, s.begin():
            run_id = self._run_id(s, run_id)
            result = s.execute(update(Iteration)
                               .where(Iteration.run_id == run_id, Iteration.arm == arm,
                                      Iteration.index == int(index),
                                      Iteration.stage.in_(sources))
                               .values(stage=to_stage, **fields)
                               .execution_options(synchronize_session=False))
            if result.rowcount == 0 and self._iteration_row(s, run_id, index, arm) is None:
                raise StoreError(f"run {run_id} has no iteration {index} (arm {arm})")
            return result.rowcount == 1

    # ---------------------------------------------------------- candidates

    def _candidate_row(self, s: Session, run_id: str, arm: str, iteration: int,
                       index: int) -> Candidate | None:
        return s.scalars(select(Candidate).where(
            Candidate.run_id == run_id, Candidate.arm == arm,
            Candidate.iteration == iteration, Candidate.index == index)).first()

    def ensure_candidate(self, run_id: str, iteration: int, index: int, *, role: str,
                         source: str, parent_id: int | None, design: dict | None,
                         arm: str = "lm", status: str = "pending",
                         reason: str = "") -> CandidateView:
        """Get-or-create the row for (run, arm, iteration, index); an existing row is
        returned unchanged, so a retried task never duplicates or rewrites a candidate."""
        check(role, ROLES, "role")
        arm_name(arm)
        check(status, CANDIDATE_STATUSES, "candidate status")
        source = text(source)
        with self._session() as s:
            run_id = self._run_id(s, run_id)
            row = self._candidate_row(s, run_id, arm, iteration, index)
            if row is not None:
                return view(CandidateView, row)
            now = utcnow()
            row = Candidate(
                run_id=run_id, iteration=int(iteration), index=int(index), role=role, arm=arm,
                parent_id=parent_id, source=source,
                sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(),
                design=dict(design) if design is not None else None, status=status,
                reason=bound_reason(reason), logs="", created_at=now,
                # A candidate can be born terminal (e.g. refused by the policy gate).
                finished_at=now if status in TERMINAL_STATUSES else None)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                # Either a concurrent caller won the race (re-read its row), or the
                # write itself is bad (e.g. unknown parent): then re-raise.
                s.rollback()
                row = self._candidate_row(s, run_id, arm, iteration, index)
                if row is None:
                    raise
            return view(CandidateView, row)

    def mark_running(self, candidate_ids: list[int]) -> None:
        if not candidate_ids:
            return
        with self._session() as s, s.begin():
            s.execute(update(Candidate)
                      .where(Candidate.id.in_(list(candidate_ids)), Candidate.status == "pending")
                      .values(status="running", started_at=utcnow())
                      .execution_options(synchronize_session=False))

    def record_result(self, candidate_id: int, *, status: str, reason: str = "",
                      score: float | None = None, param_count: int | None = None,
                      duration_s: float | None = None, logs: str = "",
                      losses: list[float] | None = None,
                      declaration: dict | None = None, evaluation_key: str | None = None,
                      reused: bool = False) -> bool:
        """Move a pending/running candidate to its final state, once.

        Returns False, changing nothing, when the candidate is already terminal: a
        retried or duplicated evaluation must not overwrite the first result.
        `evaluation_key` names the evaluation that scored it; `reused`: its stored
        outcome, no sandbox of its own.
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"{status!r} is not a terminal candidate status "
                             f"(one of {', '.join(TERMINAL_STATUSES)})")
        values = dict(status=status, reason=bound_reason(reason),
                      score=finite(score, "score"),
                      param_count=None if param_count is None else int(param_count),
                      duration_s=finite(duration_s, "duration_s"),
                      logs=bound_logs(logs), finished_at=utcnow(), declaration=declaration,
                      evaluation_key=evaluation_key, reused=bool(reused))
        curve = None if losses is None else floats(losses, "losses")
        with self._session() as s, s.begin():
            if reused and evaluation_key is not None:
                s.execute(update(Evaluation).where(Evaluation.key == evaluation_key)
                          .values(reuses=Evaluation.reuses + 1)
                          .execution_options(synchronize_session=False))
            # The status test is in the UPDATE itself, so of two concurrent writers only
            # one matches the row (PostgreSQL re-checks it after the first commits).
            result = s.execute(update(Candidate)
                               .where(Candidate.id == candidate_key(candidate_id),
                                      Candidate.status.in_(OPEN_STATUSES))
                               .values(**values)
                               .execution_options(synchronize_session=False))
            if result.rowcount == 0:
                if s.get(Candidate, candidate_key(candidate_id)) is None:
                    raise UnknownCandidate(f"unknown candidate {candidate_id}")
                return False
            if curve is not None:
                row = s.get(Candidate, candidate_key(candidate_id))
                s.add(MetricCurve(run_id=row.run_id, candidate_id=candidate_id,
                                  iteration=row.iteration, name="fewshot_loss", values=curve))
            return True

    def record_rescore(self, candidate_id: int, *, score: float | None, flagged: bool,
                       note: str = "") -> None:
        """Store the second, independent score of a would-be winner, and whether the
        two disagreed (then the candidate is flagged and selection passes it over)."""
        values: dict[str, Any] = dict(rescore=finite(score, "rescore"), flagged=bool(flagged))
        if flagged:
            values["reason"] = bound_reason(note)
        with self._session() as s, s.begin():
            result = s.execute(update(Candidate)
                               .where(Candidate.id == candidate_key(candidate_id))
                               .values(**values).execution_options(synchronize_session=False))
            if result.rowcount == 0:
                raise UnknownCandidate(f"unknown candidate {candidate_id}")

    def cancel_pending(self, run_id: str) -> int:
        with self._session() as s, s.begin():
            result = s.execute(update(Candidate)
                               .where(Candidate.run_id == self._run_id(s, run_id),
                                      Candidate.status.in_(OPEN_STATUSES))
                               .values(status="cancelled", reason="run cancelled",
                                       finished_at=utcnow())
                               .execution_options(synchronize_session=False))
            return result.rowcount

    def reopen_cancelled(self, run_id: str) -> int:
        """Undo `cancel_pending`: the candidates a cancel stopped are pending again (for
        `resume --anyway`). Returns how many."""
        with self._session() as s, s.begin():
            result = s.execute(update(Candidate)
                               .where(Candidate.run_id == self._run_id(s, run_id),
                                      Candidate.status == "cancelled")
                               .values(status="pending", reason="", finished_at=None)
                               .execution_options(synchronize_session=False))
            return result.rowcount

    def get_candidate(self, candidate_id: int) -> CandidateView:
        with self._session() as s:
            row = s.get(Candidate, candidate_key(candidate_id))
            if row is None:
                raise UnknownCandidate(f"unknown candidate {candidate_id}")
            return view(CandidateView, row)

    def candidates(self, run_id: str, *, status: str | None = None, iteration: int | None = None,
                   arm: str | None = None, texts: bool = True) -> list[CandidateView]:
        """The run's candidates. `texts=False` leaves out every source and log (the
        largest columns, up to MAX_LOG_CHARS each): those views read "" for both (the
        web view's run page and its polls need neither)."""
        with self._session() as s:
            q = select(Candidate).where(Candidate.run_id == self._run_id(s, run_id))
            if not texts:
                q = q.options(defer(Candidate.source), defer(Candidate.logs))
            if status is not None:
                q = q.where(Candidate.status == status)
            if iteration is not None:
                q = q.where(Candidate.iteration == iteration)
            if arm is not None:
                q = q.where(Candidate.arm == arm)
            rows = s.scalars(q.order_by(Candidate.arm, Candidate.iteration, Candidate.index)).all()
            blank = () if texts else ("source", "logs")
            return [view(CandidateView, r, blank) for r in rows]

    def lineage(self, candidate_id: int) -> list[CandidateView]:
        """Ancestry of a candidate: the seed source first, the candidate itself last."""
        chain: list[CandidateView] = []
        seen: set[int] = set()
        with self._session() as s:
            row = s.get(Candidate, candidate_key(candidate_id))
            if row is None:
                raise UnknownCandidate(f"unknown candidate {candidate_id}")
            while row is not None:
                if row.id in seen:
                    raise StoreError(f"lineage of candidate {candidate_id} has a cycle "
                                     f"at candidate {row.id}")
                seen.add(row.id)
                chain.append(view(CandidateView, row))
                row = None if row.parent_id is None else s.get(Candidate, row.parent_id)
        chain.reverse()
        return chain

    # ---------------------------------------------------------- evaluations

    def claim_evaluation(self, key: str, *, parts: dict, claimant: str,
                         run_id: str | None = None,
                         stale_after_s: float = 6 * 3600) -> tuple[str, EvaluationView]:
        """Claim the evaluation `key` for `claimant`, or find it done or claimed.

        Returns ("done", row): its outcome is stored, reuse it; ("claimed", row): this
        claimant runs it (a new row, its own earlier claim, a discarded outcome or a
        claim older than `stale_after_s`, whose claimant is presumed dead); ("busy",
        row): another claimant runs it now. Of concurrent claimants exactly one gets
        "claimed": a new row is an INSERT on the unique key, a take-over a
        compare-and-set on the claim it replaces."""
        key = _evaluation_key(key)
        claimant = text(claimant)[:128]
        for _ in range(8):
            with self._session() as s:
                row = s.get(Evaluation, key)
                if row is None:
                    row = Evaluation(key=key, status="running", claimant=claimant,
                                     parts=dict(parts), reason="", logs="", run_id=run_id,
                                     reuses=0, claimed_at=utcnow())
                    s.add(row)
                    try:
                        s.commit()
                        return "claimed", view(EvaluationView, row)
                    except IntegrityError:
                        s.rollback()     # another claimant inserted it first: look again
                        continue
                found = view(EvaluationView, row)
                if found.status == "done":
                    return "done", found
                if found.status == "running" and found.claimant == claimant:
                    return "claimed", found
                if found.status == "running" and \
                        utcnow() - found.claimed_at < timedelta(seconds=stale_after_s):
                    return "busy", found
                won = s.execute(update(Evaluation)
                                .where(Evaluation.key == key, Evaluation.status == row.status,
                                       Evaluation.claimant == row.claimant,
                                       Evaluation.claimed_at == row.claimed_at)
                                .values(status="running", claimant=claimant,
                                        claimed_at=utcnow(), run_id=run_id)
                                .execution_options(synchronize_session=False)).rowcount == 1
                s.commit()
                if won:
                    return "claimed", self.get_evaluation(key)
        raise StoreError(f"evaluation {key[:12]}: could not claim it (contended)")

    def complete_evaluation(self, key: str, *, claimant: str, parts: dict, status: str,
                            reusable: bool, reason: str = "", score: float | None = None,
                            param_count: int | None = None, duration_s: float | None = None,
                            logs: str = "", losses: list[float] | None = None,
                            declaration: dict | None = None, usage: dict | None = None,
                            run_id: str | None = None) -> bool:
        """Store the outcome of evaluation `key` run by `claimant`: `done` when it is
        `reusable` (it says something about the source), else `discarded`.

        Only the claimant's write completes a running claim; an evaluation nobody
        claimed (reuse off) is inserted if absent, and a discarded one replaced by a
        reusable outcome. A done evaluation is never overwritten. Returns whether this
        write stored it."""
        key = _evaluation_key(key)
        claimant = text(claimant)[:128]
        usage = usage or {}
        values = dict(status="done" if reusable else "discarded", result_status=status,
                      reason=bound_reason(reason), score=finite(score, "score"),
                      param_count=None if param_count is None else int(param_count),
                      duration_s=finite(duration_s, "duration_s"), logs=bound_logs(logs),
                      losses=None if losses is None else floats(losses, "losses"),
                      declaration=declaration, finished_at=utcnow(),
                      backend=usage.get("backend"), host=usage.get("host"),
                      wall_s=finite(usage.get("wall_s"), "wall_s"),
                      cpu_s=finite(usage.get("cpu_s"), "cpu_s"),
                      peak_rss_mb=finite(usage.get("peak_rss_mb"), "peak_rss_mb"))
        with self._session() as s:
            with s.begin():
                if s.execute(update(Evaluation)
                             .where(Evaluation.key == key, Evaluation.status == "running",
                                    Evaluation.claimant == claimant)
                             .values(**values).execution_options(synchronize_session=False)
                             ).rowcount == 1:
                    return True
                row = s.get(Evaluation, key)
                if row is not None:
                    if row.status != "discarded" or not reusable:
                        return False
                    return s.execute(update(Evaluation)
                                     .where(Evaluation.key == key, Evaluation.status == "discarded")
                                     .values(**values, claimant=claimant)
                                     .execution_options(synchronize_session=False)).rowcount == 1
            s.add(Evaluation(key=key, claimant=claimant, parts=dict(parts), run_id=run_id,
                             reuses=0, claimed_at=utcnow(), **values))
            try:
                s.commit()
                return True
            except IntegrityError:
                s.rollback()
                return False

    def get_evaluation(self, key: str) -> EvaluationView | None:
        with self._session() as s:
            row = s.get(Evaluation, _evaluation_key(key))
            return None if row is None else view(EvaluationView, row)

    def evaluations(self, run_id: str) -> dict[str, EvaluationView]:
        """The evaluations that scored the run's candidates, by key."""
        with self._session() as s:
            keys = select(Candidate.evaluation_key).where(
                Candidate.run_id == self._run_id(s, run_id), Candidate.evaluation_key.is_not(None))
            rows = s.scalars(select(Evaluation).where(Evaluation.key.in_(keys))).all()
            return {r.key: view(EvaluationView, r) for r in rows}

    # --------------------------------------------------------------- curves

    def add_curve(self, run_id: str, name: str, values: list[float], *,
                  iteration: int | None = None, candidate_id: int | None = None) -> None:
        clean = floats(values, name)
        with self._session() as s, s.begin():
            s.add(MetricCurve(run_id=self._run_id(s, run_id), name=name, values=clean,
                              iteration=iteration, candidate_id=candidate_id))

    def curves(self, run_id: str, name: str | None = None) -> list[CurveView]:
        with self._session() as s:
            q = select(MetricCurve).where(MetricCurve.run_id == self._run_id(s, run_id))
            if name is not None:
                q = q.where(MetricCurve.name == name)
            return [view(CurveView, r) for r in s.scalars(q.order_by(MetricCurve.id)).all()]


def _evaluation_key(key: Any) -> str:
    key = str(key)
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise StoreError(f"malformed evaluation key {key[:80]!r}")
    return key


_stores: dict[str, LineageStore] = {}
_stores_lock = threading.Lock()


def store_for(url: str) -> LineageStore:
    """This process's store for `url`, created or upgraded on first use and then kept
    (the coordinator's writes; `launch`)."""
    with _stores_lock:
        if url not in _stores:
            _stores[url] = LineageStore(url, create=True)
        return _stores[url]
