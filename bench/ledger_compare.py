"""The comparison of ``ledger_audit.py``: the simulators' billing logs against the
proxy's ledger (attempt rows in its database, the same attempts as
``GET /v1/predictions`` lists them, and ``GET /v1/spend``), and the tables it prints.

Matching, per upstream task (provider, task id):

* a task and an attempt carrying its id: the charges must be equal, else the task
  was **priced differently**;
* a task no attempt carries: paired, through its prompt (every prompt of the audit is
  unique), with an attempt of that prediction on that provider whose status is
  ``unknown`` (the submit's answer never arrived, so the proxy has no id; it charges
  the expected price by design). Such a pair is a **conservative charge**, not a
  discrepancy, and so is an ``unknown`` attempt with no task behind it (the request
  never created one: a hang, a drop or a malformed answer before acceptance, or a
  SIGKILL before the POST left). A task with no such attempt is **billed upstream,
  absent in the proxy**;
* an attempt with a cost and no upstream task (an id the simulator never issued, or
  no id and a status other than ``unknown``) is a discrepancy too;
* the API's attempts must equal the database's, ``/v1/spend`` must equal the sum of
  the attempt rows, each prediction's cost the sum of its attempts, and every
  prediction must be terminal.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.harness.report import render_table

PROVIDERS = ("wavespeed", "vibedream")
TERMINAL = ("completed", "failed", "canceled")


@dataclass(frozen=True)
class Task:
    """One entry of a simulator's billing log (GET /_sim/billing)."""

    provider: str
    task_id: str
    charged: int
    num_images: int
    status: str
    final: bool
    answered: bool
    sync: bool
    prompt: str

    @classmethod
    def from_log(cls, provider: str, entry: dict[str, Any]) -> Task:
        return cls(provider, str(entry["task_id"]), int(entry["charged_micro_usd"]),
                   int(entry["num_images"]), str(entry["status"]), bool(entry["final"]),
                   bool(entry["answered"]), bool(entry["sync"]), str(entry["prompt"]))


@dataclass(frozen=True)
class AttemptRow:
    prediction_id: str
    seq: int
    provider: str
    upstream_id: str | None
    status: str
    cost: int
    error_kind: str | None = None
    error: str | None = None

    def view(self) -> tuple[str, str | None, str, int]:
        """What GET /v1/predictions shows of it."""
        return (self.provider, self.upstream_id, self.status, self.cost)


@dataclass
class PredRow:
    id: str
    status: str
    prompt: str
    num_images: int
    cost: int
    attempts: list[AttemptRow] = field(default_factory=list)


@dataclass
class Ledgers:
    """Everything the comparison reads."""

    tasks: list[Task]
    preds: list[PredRow]  # the database
    api: dict[str, list[tuple[str, str | None, str, int]]]  # id -> attempts, as listed
    api_costs: dict[str, int]  # id -> the prediction's cost_micro_usd, as listed
    spend: dict[str, int]  # provider -> /v1/spend cost_micro_usd; "total"
    answered_ids: set[str]  # prediction ids the client was given
    at_kill: dict[tuple[str, int], str]  # (prediction id, seq) -> attempt status at the kill
    preds_at_kill: dict[str, str]  # prediction id -> status at the kill (non-terminal ones)


@dataclass
class Finding:
    kind: str
    provider: str | None = None
    prediction_id: str | None = None
    seq: int | None = None
    task_id: str | None = None
    simulator: int | None = None  # micro-USD
    proxy: int | None = None
    detail: str = ""


@dataclass
class Result:
    discrepancies: list[Finding]
    conservative: list[Finding]
    totals: dict[str, dict[str, int]]  # source -> provider -> micro-USD (and "total")
    counts: dict[str, dict[str, int]]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"discrepancies": [asdict(f) for f in self.discrepancies],
                "conservative": [asdict(f) for f in self.conservative],
                "totals": self.totals, "counts": self.counts, "notes": self.notes}


def _why(error: str | None) -> str:
    """The first clause of an attempt's error (the rest is boilerplate)."""
    return (error or "").split(";", 1)[0]


def _per_image(task: Task, cost: int) -> str:
    n = max(1, task.num_images)
    return f"{task.charged // n} vs {cost // n} per image"


def _kill_note(led: Ledgers, pid: str | None, seq: int | None) -> str:
    if pid is None:
        return ""
    if seq is not None and (pid, seq) in led.at_kill:
        return f"; at the SIGKILL: attempt {led.at_kill[(pid, seq)]}"
    if pid in led.preds_at_kill:
        return f"; at the SIGKILL: prediction {led.preds_at_kill[pid]}"
    return ""


def compare(led: Ledgers) -> Result:
    bad: list[Finding] = []
    cons: list[Finding] = []
    notes: list[str] = []
    by_id = {(t.provider, t.task_id): t for t in led.tasks}
    by_prompt = {p.prompt: p for p in led.preds}
    attempts = [a for p in led.preds for a in p.attempts]
    claimed: set[tuple[str, str]] = set()

    # Attempts that name an upstream task.
    for a in attempts:
        if a.upstream_id is None:
            continue
        task = by_id.get((a.provider, a.upstream_id))
        if task is None:
            bad.append(Finding("cost without an upstream task", a.provider, a.prediction_id,
                               a.seq, a.upstream_id, 0, a.cost,
                               f"attempt {a.status} names a task the simulator never created"
                               + _kill_note(led, a.prediction_id, a.seq)))
            continue
        if (a.provider, a.upstream_id) in claimed:
            bad.append(Finding("task recorded twice", a.provider, a.prediction_id, a.seq,
                               a.upstream_id, task.charged, a.cost, "two attempts name it"))
            continue
        claimed.add((a.provider, a.upstream_id))
        if a.cost != task.charged:
            bad.append(Finding("priced differently", a.provider, a.prediction_id, a.seq,
                               a.upstream_id, task.charged, a.cost,
                               f"upstream {task.status}, {task.num_images} image(s), "
                               f"{_per_image(task, a.cost)}; attempt {a.status}"
                               + (f" ({a.error_kind})" if a.error_kind else "")
                               + _kill_note(led, a.prediction_id, a.seq)))

    # Tasks no attempt names: an `unknown` attempt of the same prediction and provider?
    unknown_used: set[tuple[str, int]] = set()
    for t in led.tasks:
        if (t.provider, t.task_id) in claimed:
            continue
        pred = by_prompt.get(t.prompt)
        match = None if pred is None else next(
            (a for a in pred.attempts if a.provider == t.provider and a.status == "unknown"
             and a.upstream_id is None and (a.prediction_id, a.seq) not in unknown_used), None)
        answer = "answered" if t.answered else "never answered"
        if match is None:
            where = "no prediction has its prompt" if pred is None else (
                f"prediction {pred.status}, no unknown attempt on {t.provider} left to pair")
            bad.append(Finding("billed upstream, absent in the proxy", t.provider,
                               pred.id if pred else None, None, t.task_id, t.charged, 0,
                               f"task {t.status}, submit {answer}; {where}"
                               + _kill_note(led, pred.id if pred else None, None)))
            continue
        unknown_used.add((match.prediction_id, match.seq))
        cons.append(Finding("unknown attempt, task existed upstream", t.provider,
                            match.prediction_id, match.seq, t.task_id, t.charged, match.cost,
                            f"task {t.status}, submit {answer}, "
                            f"{_per_image(t, match.cost)}; {_why(match.error)}"
                            + _kill_note(led, match.prediction_id, match.seq)))

    for a in attempts:
        if a.upstream_id is not None or (a.prediction_id, a.seq) in unknown_used:
            continue
        if a.status == "unknown":
            cons.append(Finding("unknown attempt, nothing upstream", a.provider,
                                a.prediction_id, a.seq, None, 0, a.cost,
                                _why(a.error) + _kill_note(led, a.prediction_id, a.seq)))
        elif a.cost:
            bad.append(Finding("cost without an upstream task", a.provider, a.prediction_id,
                               a.seq, None, 0, a.cost, f"attempt {a.status} has no upstream id"))

    _consistency(led, bad, notes)
    totals = _totals(led, cons)
    return Result(bad, cons, totals, _counts(led), notes)


def _consistency(led: Ledgers, bad: list[Finding], notes: list[str]) -> None:
    db_ids = {p.id for p in led.preds}
    for p in led.preds:
        listed = led.api.get(p.id)
        if listed is None:
            bad.append(Finding("API and database disagree", None, p.id,
                               detail="the prediction is missing from GET /v1/predictions"))
        elif listed != [a.view() for a in p.attempts]:
            bad.append(Finding("API and database disagree", None, p.id,
                               detail=f"API {listed} vs database "
                               f"{[a.view() for a in p.attempts]}"))
        summed = sum(a.cost for a in p.attempts)
        if p.status in TERMINAL and p.cost != summed:
            bad.append(Finding("prediction cost is not the sum of its attempts", None, p.id,
                               proxy=p.cost, detail=f"attempts sum to {summed}"))
        if p.id in led.api_costs and led.api_costs[p.id] != summed:
            bad.append(Finding("API prediction cost is not the sum of its attempts", None,
                               p.id, proxy=led.api_costs[p.id],
                               detail=f"attempts sum to {summed}"))
        if p.status not in TERMINAL:
            bad.append(Finding("prediction not terminal", None, p.id, detail=p.status))
    for pid in sorted(set(led.api) - db_ids):
        bad.append(Finding("API and database disagree", None, pid,
                           detail="listed by the API, absent from the database"))
    for pid in sorted(led.answered_ids - db_ids):
        bad.append(Finding("answered prediction missing", None, pid,
                           detail="the client was given this id; the database has no row"))
    db_sum: Counter[str] = Counter()
    for a in (a for p in led.preds for a in p.attempts):
        db_sum[a.provider] += a.cost
    for name in sorted(set(db_sum) | (set(led.spend) - {"total"})):
        if led.spend.get(name, 0) != db_sum[name]:
            bad.append(Finding("spend API and attempts disagree", name,
                               simulator=None, proxy=led.spend.get(name, 0),
                               detail=f"attempt rows sum to {db_sum[name]}"))
    if led.spend.get("total", 0) != sum(db_sum.values()):
        bad.append(Finding("spend API and attempts disagree", None, proxy=led.spend["total"],
                           detail=f"total; attempt rows sum to {sum(db_sum.values())}"))
    pending = [t for t in led.tasks if not t.final]
    if pending:
        notes.append(f"{len(pending)} simulator task(s) had not ended when read "
                     "(their charges are what they will be at their end)")


def _totals(led: Ledgers, cons: list[Finding]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(dict)
    api_sum: Counter[str] = Counter()
    for attempts in led.api.values():
        for provider, _, _, cost in attempts:
            api_sum[provider] += cost
    for name in (*PROVIDERS, "total"):
        out["simulator"][name] = sum(t.charged for t in led.tasks if _in(name, t.provider))
        out["attempts"][name] = sum(a.cost for p in led.preds for a in p.attempts
                                    if _in(name, a.provider))
        out["api"][name] = sum(c for p, c in api_sum.items() if _in(name, p))
        out["spend"][name] = led.spend.get(name, 0)
        out["conservative"][name] = sum((f.proxy or 0) - (f.simulator or 0) for f in cons
                                        if _in(name, f.provider))
    return dict(out)


def _in(column: str, provider: str | None) -> bool:
    return column == "total" or provider == column


def _counts(led: Ledgers) -> dict[str, dict[str, int]]:
    attempts: Counter[str] = Counter()
    for a in (a for p in led.preds for a in p.attempts):
        attempts[f"{a.provider} {a.status}"] += 1
    tasks: Counter[str] = Counter()
    for t in led.tasks:
        tasks[f"{t.provider} {t.status}"] += 1
        if not t.answered:
            tasks[f"{t.provider} never answered"] += 1
    return {"predictions": dict(Counter(p.status for p in led.preds)),
            "attempts": dict(sorted(attempts.items())),
            "tasks": dict(sorted(tasks.items()))}


# --------------------------------------------------------------------------- report


def usd(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    return f"{sign}${abs(micro) / 1_000_000:,.6f}"


def totals_table(res: Result) -> str:
    t = res.totals
    rows = []
    for name in (*PROVIDERS, "total"):
        gap = t["simulator"][name] - t["attempts"][name]
        unexplained = gap + t["conservative"][name]
        rows.append([name, usd(t["simulator"][name]), usd(t["attempts"][name]),
                     usd(t["api"][name]), usd(t["spend"][name]), usd(gap),
                     usd(-t["conservative"][name]), usd(unexplained)])
    return render_table(["provider", "simulators billed", "proxy attempts (db)",
                         "GET /v1/predictions", "GET /v1/spend", "billed - attempts",
                         "of which conservative", "unexplained"], rows)


def counts_table(res: Result, client: dict[str, int]) -> str:
    rows: list[list[str]] = []
    for group, counts in (("predictions", res.counts["predictions"]),
                          ("attempts", res.counts["attempts"]),
                          ("simulator tasks", res.counts["tasks"]), ("client", client)):
        rows += [[group, k, str(v)] for k, v in sorted(counts.items())]
    return render_table(["what", "status", "count"], rows)


def findings_table(findings: list[Finding]) -> str:
    rows = [[f.kind, f.provider or "-", f.prediction_id or "-",
             "-" if f.seq is None else str(f.seq), f.task_id or "-",
             "-" if f.simulator is None else str(f.simulator),
             "-" if f.proxy is None else str(f.proxy), f.detail[:200].replace("|", "/")]
            for f in findings]
    return render_table(["finding", "provider", "prediction", "attempt", "upstream task",
                         "simulator µUSD", "proxy µUSD", "detail"], rows)


CONSERVATIVE_NOTE = (
    "Conservative charges are not discrepancies: an attempt whose submit got no answer "
    "(dropped connection, timeout, malformed body, a SIGKILL between the attempt row and "
    "its upstream id) has status 'unknown' and no upstream id, so the proxy can neither "
    "poll nor cancel it, and it records the expected price (the provider's list price x "
    "images) because the task may exist and be billed. Paired through the prompt with "
    "the task the simulator did create, the charge can still differ: the simulator may "
    "have refunded a failed task (WaveSpeed), or quoted a price other than the proxy's "
    "list price (VibeDream costCents vs fallback_cost_cents_per_image). 'nothing "
    "upstream': no task was created (fault before acceptance), so the proxy's ledger "
    "is above the bill by that amount.")


def grouped_table(findings: list[Finding]) -> str:
    """Findings by provider and cause: how many, how much."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for f in findings:
        cause = f.detail.split(";", 1)[0]
        cause = cause.split(": ", 1)[-1] if cause.startswith(f"{f.provider}: ") else cause
        g = groups[(f.provider or "-", cause)]
        g[0] += 1
        g[1] += f.proxy or 0
    rows = [[p, c, str(n), usd(m)] for (p, c), (n, m) in sorted(groups.items())]
    return render_table(["provider", "cause (the attempt's error)", "attempts", "charged"],
                        rows)


def report(res: Result, client: dict[str, int], *, verbose: bool = False) -> str:
    out = ["## Totals (USD; micro-USD exact in --json)", "", totals_table(res), "",
           "'of which conservative': what the conservative charges below put on the "
           "proxy's books beyond the bill; 'unexplained' is the rest, and is 0 when the "
           "ledgers agree.", "", "## Counts", "", counts_table(res, client), ""]
    out += [f"## Discrepancies: {len(res.discrepancies)}", ""]
    if res.discrepancies:
        out += [findings_table(res.discrepancies), ""]
    kinds = Counter(f.kind for f in res.conservative)
    out += [f"## Conservative charges: {len(res.conservative)} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")", ""]
    existed = [f for f in res.conservative if f.task_id is not None]
    nothing = [f for f in res.conservative if f.task_id is None]
    if existed:
        out += ["With a task upstream (paired through the prompt):", "",
                findings_table(existed), ""]
    if nothing:
        out += ["Nothing upstream, by cause:", "", grouped_table(nothing), ""]
        if verbose:
            out += [findings_table(nothing), ""]
    out += [CONSERVATIVE_NOTE, ""]
    out += [f"note: {n}" for n in res.notes]
    return "\n".join(out)
