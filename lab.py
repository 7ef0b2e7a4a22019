"""
The laptop lab's runs side by side: train the named runs a few at a time, show every run's step,
loss and time left while they train, reuse what is already trained, then measure them all together
at matched loss (and, with --sweep, draw the commit-sparsity dose-response).

    python lab.py vanilla-s1337 ledger-s1337 [more runs] [--key=value ...]
    python lab.py vanilla-s1337 ledger-cs0-s1337 ledger-cs0.3-s1337 --sweep --measure_dir=out/lab/sweep

`make demo`, `make lab-all` and `make lab-sweep` call it. A run's name says how it is trained, and
it is the name of its folder under --out_root:

    <arm>-s<seed>             an arm of ledger.py trained with --config and that seed; the arm
                              vanilla-sgd is vanilla trained with SGD (--sgd_flags), and an arm
                              ARCH+KIND (vanilla+gated) is ARCH with that attention kind
    <arm>-cs<lambda>-s<seed>  a Ledger arm trained with commit_sparsity = lambda; at an arm's own
                              lambda it is that arm's run (ledger-cs0.02 is ledger, -cs0.3 ledger-hs)
    <arm>[-cs<lambda>]-nopos0-s<seed>
                              the same, with position 0's target left out of the training loss
    <arm>[-cs<lambda>]-<route>-s<seed>
                              with --retrofit=MODEL: the arm retrofitted onto that pretrained model
                              (train.py --init_from=MODEL), started on route corner or released
                              (ledgerlab/retrofit.py); `make retrofit` trains four such runs

--train_flags sets more train.py settings for every run: --train_flags=--max_iters=1000 trains a
short lab, and summary.md then says it is one.

A run whose ckpt.pt has reached max_iters is reused as it is. One whose ckpt.pt is short of it (an
interrupted run) resumes with --init_from=resume, and any other starts from scratch. Each run trains
in its own process on one thread (OMP_NUM_THREADS=1), its output appended to train.log in its
folder; the progress shown is read from the log.jsonl that train.py writes beside it. Ctrl-C stops
every run at the end of its iteration with a saved checkpoint: the same command then resumes them.

What is trained and measured is train.py's and measure.py's: this file runs them as a user would,
asks them first (--dry_run) whether every setting is right and how long each run trains, and only
schedules the runs and shows them. Read top to bottom: config, run names, progress, training, main.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ledger import ARCHS, ATTENTIONS, GPTConfig
from ledgerlab import cli, rundir
from ledgerlab.metrics_json import read_metrics
from ledgerlab.reports import sweep_report

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY, MEASURE_PY = os.path.join(HERE, "train.py"), os.path.join(HERE, "measure.py")
POLL_S = 0.5     # how often finished runs are noticed and the next ones started


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class LabConfig:
    out_root: str = "out/lab"        # each run trains into <out_root>/<run name>
    config: str = "config/lab.py"    # the training preset every run starts from
    train_flags: str = ""            # more train.py settings for every run, e.g. "--max_iters=1000" (a short lab)
    jobs: int = 2                    # runs trained at once, each on one CPU thread
    refresh_s: float = 5.0           # seconds between progress updates
    sgd_flags: str = "--optimizer=sgd --learning_rate=0.5 --min_lr=0.05 --weight_decay=0"  # train.py settings of vanilla-sgd:
                                       # SGD needs a far larger step than AdamW to learn the task in as many steps,
                                       # and no weight decay (at that step 0.1 shrinks every weight by 5% per step)
    measure: bool = True             # once trained, measure all runs together with measure.py
    measure_dir: str = ""            # measure.py's --out_dir; "" = <out_root>/measure
    measure_flags: str = "--match_loss=auto --num_windows=512 --batch_size=128 --threads=2"  # measure.py's settings
    sweep: bool = False              # then C's numbers against lambda over seeds: sweep.png, .md, .json in measure_dir
    retrofit: str = ""               # a pretrained model (train.py --init_from): every run is retrofitted onto it
                                       # and names its route, <arm>-<corner|released>-s<seed>

    LIMITS = {"jobs": ">= 1", "refresh_s": "> 0"}


class RunFailed(Exception):
    """A training run failed: one line `error: ...` and exit status 1, after the others stopped."""


# ----------------------------------------------------------------------------------------------
# Run names: what each run is, and what is left to do for it

RUN_NAME = re.compile(r"(?P<arm>[a-z0-9_+-]+?)(?:-cs(?P<lam>\d+(?:\.\d+)?))?(?P<nopos0>-nopos0)?"
                      r"(?:-(?P<route>corner|released))?-s(?P<seed>\d+)")


@dataclass
class Run:
    name: str
    out_dir: str
    argv: list                       # train.py's arguments, --init_from aside
    max_iters: int = 0               # as train.py --dry_run resolves it
    state: str = "queued"            # queued, reused, running, done, failed
    resume_from: Optional[int] = None  # the iteration of an unfinished ckpt.pt
    log_offset: int = 0              # log.jsonl's size at launch: progress reads only what follows
    process: Optional[subprocess.Popen] = field(default=None, repr=False)
    started: float = 0.0
    ended: float = 0.0
    init: str = "scratch"            # a new run's --init_from: scratch, or the pretrained model of a retrofit


def plan_run(name, cfg):
    """The Run a name stands for: its folder and train.py's arguments (check_settings asks train.py
    whether it takes them)."""
    match = RUN_NAME.fullmatch(name)
    if not match:
        raise cli.ConfigError(f"run name {name!r}: expected <arm>[-cs<lambda>][-nopos0][-<route>]-s<seed>, "
                              f"e.g. ledger-cs0.02-s1337")
    if bool(match["route"]) != bool(cfg.retrofit):
        raise cli.ConfigError(f"run name {name!r}: " + ("a route (-corner, -released) names a retrofit; give "
                                                        "--retrofit=MODEL" if match["route"] else
                                                        f"a run retrofitted onto {cfg.retrofit} names its route, "
                                                        f"e.g. ledger-corner-s1337"))
    arm, lam, seed = match["arm"], match["lam"], match["seed"]
    base, plus, attention = arm.partition("+")
    arch, flags = ("vanilla", shlex.split(cfg.sgd_flags)) if base == "vanilla-sgd" else (base, [])
    if arch not in ARCHS:
        raise cli.ConfigError(f"run name {name!r}: unknown arm {base!r}; known: {', '.join(ARCHS)}, vanilla-sgd "
                              f"(each may take +KIND, an attention kind: {', '.join(ATTENTIONS)})")
    if plus:
        if attention not in ATTENTIONS:
            raise cli.ConfigError(f"run name {name!r}: unknown attention {attention!r}; choose one of "
                                  f"{', '.join(ATTENTIONS)}")
        flags.append(f"--attention={attention}")
    if lam is not None:
        if GPTConfig(arch=arch).residual != "ledger":
            raise cli.ConfigError(f"run name {name!r}: -cs<lambda> sets the commit sparsity, which only Ledger arms "
                                  f"have")
        own = next((a for a in ("ledger", "ledger-hs") if GPTConfig(arch=a).commit_sparsity == float(lam)), None)
        if own:   # ledger-cs0.02 is ledger, and ledger-cs0.3 is ledger-hs: one run, trained once, under the arm's name
            route = f"-{match['route']}" if match["route"] else ""
            return plan_run(f"{own}{arm[len(base):]}{match['nopos0'] or ''}{route}-s{seed}", cfg)
        flags.append(f"--commit_sparsity={lam}")
    if match["nopos0"]:  # what grows the lab's outlier: position 0's own prediction, or the sink?
        flags.append("--train_position0=False")
    if match["route"]:
        flags.append(f"--retrofit_route={match['route']}")
    out_dir = os.path.join(cfg.out_root, name)
    argv = [cfg.config, *shlex.split(cfg.train_flags), f"--arch={arch}", f"--seed={seed}", f"--out_dir={out_dir}",
            *flags]   # after train_flags: what the name says wins
    return Run(name, out_dir, argv, init=cfg.retrofit or "scratch")


def ask(label, script, argv):
    """The settings `script argv --dry_run` resolves (its last line, JSON), or its error line after the label."""
    done = subprocess.run([sys.executable, script, *argv, "--dry_run"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise cli.ConfigError(f"{label}: {error.removeprefix('error: ')}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_settings(runs, measure_argv, cfg):
    """train.py and measure.py, asked before anything starts: is every setting right, and how many
    steps does each run train? Runs that differ only in their seed are asked once."""
    if cfg.measure:
        ask("--measure_flags (measure.py)", MEASURE_PY, measure_argv)
    steps = {}
    for run in runs:
        setting = tuple(a for a in run.argv if not a.startswith(("--seed=", "--out_dir=")))
        if setting not in steps:
            init = run.init if run.resume_from is None else "resume"
            settings = ask(f"{run.name} (train.py)", TRAIN_PY, [*run.argv, f"--init_from={init}"])
            steps[setting] = settings["train"]["max_iters"]
        run.max_iters = steps[setting]


def check_progress_so_far(run):
    """The iteration of an unfinished or finished ckpt.pt, read before anything starts: a run that has
    reached its max_iters is reused, one short of it resumed, and one without ckpt.pt starts anew."""
    path = os.path.join(run.out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return
    try:
        run.resume_from = rundir.load_checkpoint(path)["iter_num"]
    except cli.ConfigError as e:
        raise cli.ConfigError(f"{run.name}: {e}; move it away to retrain the run") from None


# ----------------------------------------------------------------------------------------------
# Progress: each run's latest step, loss and time left, from the log.jsonl train.py writes

def read_log(path, offset=0):
    """The records appended to a log.jsonl after byte `offset`. A line still being written is
    skipped; it is read whole at the next update."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def status_text(run, now):
    """One run's line: its state, or its last logged step with loss, val loss and time left."""
    if run.state == "queued":
        return "queued" + (f", resumes at iter {run.resume_from}" if run.resume_from is not None else "")
    if run.state == "reused":
        return f"trained before (iter {run.resume_from}/{run.max_iters}): reused"
    if run.state == "failed":
        return f"failed (exit {run.process.returncode}); see {os.path.join(run.out_dir, 'train.log')}"
    records = read_log(os.path.join(run.out_dir, "log.jsonl"), run.log_offset)
    steps = [r for r in records if "ms_per_iter" in r]
    evals = [r for r in records if "val_loss" in r]
    if not steps:
        where = f"resuming at iter {run.resume_from}" if run.resume_from is not None else "starting"
        return where + (f", val loss {evals[-1]['val_loss']:.4f}" if evals else "")
    last, width = steps[-1], len(str(run.max_iters))
    text = f"iter {last['iter']:>{width}}/{run.max_iters}  loss {last['loss']:.4f}"
    if evals:
        text += f"  val {evals[-1]['val_loss']:.4f}"
    if run.state == "done":
        return text + f"  done in {cli.duration(run.ended - run.started)}"
    # The mean over this launch's records: the intervals that hold an evaluation count too, so the
    # estimate includes the evaluations still to come (train.py's own line leaves them out).
    ms_per_iter = np.mean([r["ms_per_iter"] for r in steps])
    return text + f"  {cli.duration((run.max_iters - last['iter']) * ms_per_iter / 1000)} left"


class Progress:
    """Every run's line. On a terminal the block is redrawn in place every refresh; elsewhere (a
    log file, a pipe) a run's line is printed again only when it changed."""

    def __init__(self, runs, out=None):
        self.runs, self.out, self.t0 = runs, out or sys.stdout, time.time()
        self.in_place = self.out.isatty()
        self.width = max(len(r.name) for r in runs)
        self.shown, self.drawn = {}, 0

    def erase(self):
        if self.in_place and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")   # up over the block, clear to the end
            self.drawn = 0

    def event(self, text):
        """A line that stays: a run starting or ending."""
        self.erase()
        print(text, file=self.out, flush=True)

    def update(self):
        now = time.time()
        lines = {r.name: f"{r.name:<{self.width}}  {status_text(r, now)}" for r in self.runs}
        clock = f"[{cli.duration(now - self.t0):>6}]"
        if self.in_place:
            self.erase()
            counts = {s: sum(r.state == s for r in self.runs) for s in ("running", "queued")}
            block = [f"{clock} {counts['running']} training, {counts['queued']} queued", *lines.values()]
            self.out.write("\n".join(block) + "\n")
            self.drawn = len(block)
        else:
            for name, line in lines.items():
                if self.shown.get(name) != line:
                    self.out.write(f"{clock} {line}\n")
            self.shown = lines
        self.out.flush()


# ----------------------------------------------------------------------------------------------
# Training: the runs `jobs` at a time

def start(run):
    os.makedirs(run.out_dir, exist_ok=True)
    log = os.path.join(run.out_dir, "log.jsonl")
    run.log_offset = os.path.getsize(log) if os.path.exists(log) else 0
    init = run.init if run.resume_from is None else "resume"
    with open(os.path.join(run.out_dir, "train.log"), "a") as out:   # the child keeps its own handle
        run.process = subprocess.Popen([sys.executable, TRAIN_PY, *run.argv, f"--init_from={init}"],
                                       stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run.state, run.started = "running", time.time()
    return f"=== training {run.name} ({init}" + (f" from iter {run.resume_from}" if init == "resume" else "") \
        + f") -> {run.out_dir}"


def tail(path, n):
    with open(path, errors="replace") as f:
        return f.read().splitlines()[-n:]


def stop_signal(signum, frame):
    raise KeyboardInterrupt   # SIGTERM stops the lab as Ctrl-C does: every run saves, then it exits


def train_runs(runs, cfg):
    """Start the queued runs `jobs` at a time and show the progress of all until they end. After a
    failure no new run starts; the running ones finish."""
    progress = Progress(runs)
    queue = [r for r in runs if r.state == "queued"]
    running, failed, last_update = [], [], 0.0
    previous = signal.signal(signal.SIGTERM, stop_signal)
    try:
        while running or (queue and not failed):
            while queue and len(running) < cfg.jobs and not failed:
                running.append(queue.pop(0))
                progress.event(start(running[-1]))
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                run.ended = time.time()
                train_log = os.path.join(run.out_dir, "train.log")
                if run.process.returncode == 0:
                    run.state = "done"
                    progress.event(f"    {run.name}: {' '.join(tail(train_log, 1))}")
                else:
                    run.state = "failed"
                    failed.append(run)
                    progress.event("\n".join([f"    {run.name} failed (exit {run.process.returncode}); "
                                              f"the end of {train_log}:", *tail(train_log, 5)]))
            if time.time() - last_update >= cfg.refresh_s:
                progress.update()
                last_update = time.time()
            if running:
                time.sleep(POLL_S)
        progress.update()   # the final state of every run, reused ones included
    except KeyboardInterrupt:
        progress.event(f"stopping: {len(running)} running runs save a checkpoint first (run the same command "
                       f"again to resume them)")
        for run in running:
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)   # train.py saves ckpt.pt and exits
        for run in running:
            run.process.wait()
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise RunFailed(f"{', '.join(r.name for r in failed)} failed; "
                        f"{len(queue)} runs not started; fix it and run the same command again")


# ----------------------------------------------------------------------------------------------
# Main

def run_lab(names, cfg, command=()):
    if not names:
        raise cli.ConfigError("name at least one run, e.g. vanilla-s1337 ledger-cs0.02-s1337")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise cli.ConfigError(f"run {', '.join(repeated)} named twice")
    for key in ("train_flags", "sgd_flags", "measure_flags"):
        try:
            shlex.split(getattr(cfg, key))
        except ValueError as e:   # an unclosed quote
            raise cli.ConfigError(f"--{key}: {e}") from None
    runs = {}
    for name in names:
        run = plan_run(name, cfg)
        if run.name != name:
            print(f"{name} is {run.name}: that lambda is the arm's own commit sparsity")
        runs.setdefault(run.name, run)
    runs = list(runs.values())
    measure_dir = cfg.measure_dir or os.path.join(cfg.out_root, "measure")
    measure_argv = [*(r.out_dir for r in runs), *shlex.split(cfg.measure_flags), f"--out_dir={measure_dir}"]
    for run in runs:   # every name, folder and setting checked before any run starts
        rundir.check_free(run.out_dir, "--out_root")
        check_progress_so_far(run)
    check_settings(runs, measure_argv, cfg)
    for run in runs:
        if run.resume_from is not None and run.resume_from >= run.max_iters:
            run.state = "reused"
    train_runs(runs, cfg)
    if not cfg.measure:
        return None
    print(f"=== measuring at matched loss -> {measure_dir}", flush=True)
    if subprocess.run([sys.executable, MEASURE_PY, *measure_argv]).returncode != 0:
        raise RunFailed(f"measure.py failed on the trained runs; measure them again with: "
                        f"python measure.py {shlex.join(measure_argv)}")
    results = [read_metrics(os.path.join(measure_dir, r.name) if len(runs) > 1 else measure_dir) for r in runs]
    if cfg.sweep:
        sweep_report(results, measure_dir, command)
        print(f"sweep: {os.path.join(measure_dir, 'sweep.md')}, sweep.png and sweep.json beside it")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    (settings,) = cli.run_main(lambda: cli.parse_overrides([a for a in argv if a.startswith("-")], LabConfig,
                                                           doc=__doc__))
    try:
        return cli.run_main(lambda: run_lab([a for a in argv if not a.startswith("-")], LabConfig(**settings), argv))
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
