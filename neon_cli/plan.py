"""The output plan of a run: every path it will read and every path it will write, checked before any work.

One place knows, for every command, what a run touches (issue 22 item 1, issue 25 item 2):

* :class:`Plan` (frozen): ``reads`` and ``writes``, each an :class:`Entry` (a path with a role such as
  ``base``, ``base member``, ``--report``, ``-o member``, ``family file``);
* :func:`check_plan`: the one rule, for any plan. A write may not be the same file as any read or any
  other write (same resolved path: ``..``, relative spellings and symlinks; or the same ``(st_dev,
  st_ino)``: a hard link), nor lie inside an input folder or inside another output folder (unless it
  is declared as one of that folder's files). A write that exists as a device, FIFO or socket (also
  through a symlink), and an empty path (``-o ''``), are refused; so is an input that is a device,
  FIFO or socket, by name, before anything opens it (reading one would block forever);
* one builder per command (:func:`synth_plan`, :func:`merge_plan`, ...) from its parsed options.
  Reads are every named input, every file inside an input folder (shards, ``*.index.json``,
  ``model_index.json``, ``unet/config.json``, ...), glob matches (``--selftrained 'ft/*'``), the
  family's embedded default when ``--base``/``--model`` is left out, and the files a family loads
  that the user did not name (:func:`neon_cli.family.files_read`: classifiers, VAEs), detector and
  reference statistics (flags or ``$NEON_INCEPTION`` / ``$NEON_REF_STATS``). Writes are ``-o`` (a
  file, or a folder and every file the run will create or rewrite in it, existing ones included on
  resume), ``--report``, ``--cache``, ``--plot`` and their temporary and lock files.

The error boundary (:func:`neon_cli.commands.boundary.run`) builds the plan, asks
:func:`report_problem` whether the failure report may be written at all, checks the plan, and with
``--dry-run`` prints it (:meth:`Plan.to_json`) instead of working. A request object of
:mod:`neon_cli.requests` (``MergeRequest``, ...) builds its plan with ``plan()``. Torch-free.
"""

from __future__ import annotations

import contextvars
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from neon_cli.errors import UsageError

#: Files listed per input or output folder at most (a folder of images may hold many; beyond this
#: the folder itself still protects its files through the "inside" rule).
MAX_MEMBERS = 200_000

#: Environment variables naming scoring files (the same as neon_cli.inception / the families read).
DETECTOR_ENV = "NEON_INCEPTION"
REF_STATS_ENV = "NEON_REF_STATS"

_CHECKPOINT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".pickle"}


@dataclass(frozen=True)
class Entry:
    """One path of a plan.

    ``role``: the flag or role as the user knows it (``--report``, ``base``, ``-o member``,
    ``family file``). ``member_of``: for a file inside a named folder, that folder's role (a write
    with ``member_of`` may lie inside the folder write of that role, or inside the input of that
    role: the encoding cache, :func:`encoding_cache_writes`). ``folder``: a write that is a
    folder (other writes may not lie inside it, existing or not).
    """

    role: str
    path: Path
    member_of: Optional[str] = None
    folder: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "path": str(self.path)}
        if self.folder:
            out["folder"] = True
        return out

    def label(self) -> str:
        """How a message names it: ``base`` or ``base (its file A/x.json)``."""
        return f"{self.member_of} (its file {self.path})" if self.member_of else self.role


@dataclass(frozen=True)
class Plan:
    """What one run reads and writes (see the module docstring). ``problems``: refusals found
    while building it (an empty path), raised by :func:`check_plan` like any overlap."""

    command: str
    reads: tuple[Entry, ...] = ()
    writes: tuple[Entry, ...] = ()
    problems: tuple[tuple[str, str], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """``{"command", "reads": [{"role", "path"}], "writes": [...]}`` (``--dry-run --json``)."""
        return {"command": self.command, "reads": [e.to_json() for e in self.reads],
                "writes": [e.to_json() for e in self.writes]}

    def roles(self) -> set[str]:
        return {e.role for e in self.writes}


# --------------------------------------------------------------------------------------------
# the one check


def _kind(mode: int) -> Optional[str]:
    """Name of a special file type (None for a regular file or a folder)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


@dataclass
class _Info:
    entry: Entry
    resolved: Path
    ident: Optional[tuple[int, int]]
    is_dir: bool
    special: Optional[str]


def _info(e: Entry, resolved_dirs: dict[str, Path] | None = None) -> _Info:
    try:
        st = os.stat(e.path)  # follows symlinks: a link to /dev/null is a device; never opens the file
    except (OSError, ValueError):
        st = None
    text = str(e.path)
    parent, name = os.path.split(text)
    try:
        if resolved_dirs is not None and name not in ("", ".", "..") and not os.path.islink(text):
            if parent not in resolved_dirs:  # one resolve per folder, not per file (a folder of 50k images)
                resolved_dirs[parent] = Path(parent or ".").resolve()
            resolved = resolved_dirs[parent] / name
        else:
            resolved = Path(os.path.abspath(e.path)).resolve()
    except (OSError, RuntimeError):
        resolved = Path(os.path.abspath(e.path))
    return _Info(e, resolved, (st.st_dev, st.st_ino) if st else None,
                 bool(st and stat.S_ISDIR(st.st_mode)), _kind(st.st_mode) if st else None)


def problems(plan: Plan) -> list[tuple[frozenset[str], str]]:
    """Every refusal of ``plan``: (the roles involved, the one-line message), in a stable order.

    Empty paths and special files first, then each write against every read and every other write.
    """
    out: list[tuple[frozenset[str], str]] = [(frozenset({r}), m) for r, m in plan.problems]
    dirs: dict[str, Path] = {}
    reads = [_info(e, dirs) for e in plan.reads]
    writes = [_info(e, dirs) for e in sorted(plan.writes, key=lambda e: e.member_of is not None)]  # named paths first
    for w in writes:
        if str(w.entry.path) == "":
            out.append((frozenset({w.entry.role}), f"{w.entry.role}: empty path; give a file name"))
        elif w.special:
            role = w.entry.member_of or w.entry.role
            out.append((frozenset({w.entry.role, role}), f"{role}: {w.entry.path} is {w.special}, not a regular file; "
                                                         "give the path of a file to write"))
    seen_special: set[Path] = set()
    for r in reads:
        if r.special and r.resolved not in seen_special:
            seen_special.add(r.resolved)
            out.append((frozenset({r.entry.member_of or r.entry.role}),
                        f"{r.entry.member_of or r.entry.role}: {r.entry.path} is {r.special}, not a regular file or folder; "
                        "neon reads only files and folders (it would block reading it)"))
    by_path: dict[Path, list[_Info]] = {}
    by_ident: dict[tuple[int, int], list[_Info]] = {}
    folders: dict[Path, list[_Info]] = {}
    read_ids = {id(i) for i in reads}
    for i in reads + writes:
        by_path.setdefault(i.resolved, []).append(i)
        if i.ident:
            by_ident.setdefault(i.ident, []).append(i)
        if i.is_dir if id(i) in read_ids else i.entry.folder:
            folders.setdefault(i.resolved, []).append(i)
    reported: set[tuple[int, int]] = set()
    for w in writes:
        if str(w.entry.path) == "":
            continue
        others = [o for o in by_path.get(w.resolved, []) + (by_ident.get(w.ident, []) if w.ident else []) if o is not w]
        for o in others:
            if id(o) in read_ids and w.entry.member_of is not None and w.entry.member_of in (o.entry.role, o.entry.member_of):
                continue  # a cache the run keeps inside that input on purpose (encoding_cache_writes)
            if id(o) in read_ids:
                if o.entry.member_of and str(o.entry.path) == str(w.entry.path):
                    what = f"a file of the input {o.entry.member_of}"
                elif not o.entry.member_of and str(o.entry.path) != str(w.entry.path):
                    what = f"the input {o.entry.role} ({o.entry.path})"  # another spelling, a link: name both paths
                else:
                    what = f"the input {o.entry.label()}"
                msg = f"{w.entry.role}: {w.entry.path} is also {what}; choose another path (inputs are never overwritten)"
            else:
                pair = (min(id(o), id(w)), max(id(o), id(w)))
                if pair in reported or _same_role(w.entry, o.entry):
                    continue
                reported.add(pair)
                msg = f"{w.entry.role}: {w.entry.path} is also the output of {o.entry.label()}; give each output its own path"
            out.append((frozenset({w.entry.role, o.entry.role, o.entry.member_of or o.entry.role}), msg))
            break
        for parent in w.resolved.parents:
            for f in folders.get(parent, []):
                if f is w or (id(f) in read_ids and w.entry.member_of == f.entry.role):
                    continue
                if id(f) in read_ids:
                    msg = f"{w.entry.role}: {w.entry.path} is inside the input {f.entry.label()} ({f.entry.path}); choose a path outside it"
                elif w.entry.member_of == f.entry.role:
                    continue
                else:
                    msg = (f"{w.entry.role}: {w.entry.path} is inside the output folder {f.entry.label()} ({f.entry.path}); "
                           "choose a path outside it")
                out.append((frozenset({w.entry.role, f.entry.role}), msg))
                break
            else:
                continue
            break
    return out


def _same_role(a: Entry, b: Entry) -> bool:
    """Two writes of the same output (a folder and its own files, or one file listed twice)."""
    return a.role == b.role or a.member_of == b.role or b.member_of == a.role or (
        a.member_of is not None and a.member_of == b.member_of)


def check_plan(plan: Plan) -> None:
    """Raise :class:`~neon_cli.errors.UsageError` (exit 2) with the first of :func:`problems`, e.g.
    ``--report: A/model.safetensors.index.json is inside the input base (A); choose a path outside it``."""
    found = problems(plan)
    if found:
        raise UsageError(found[0][1])


def report_problem(plan: Plan, role: str = "--report") -> Optional[str]:
    """The first refusal that involves the write ``role`` (the failure report's path), or None
    when the report may be written whatever else fails."""
    for roles, msg in problems(plan):
        if role in roles:
            return msg
    return None


# --------------------------------------------------------------------------------------------
# building blocks


#: Path flags of the command being run that were given an empty value (:func:`note_empty_paths`).
_EMPTY: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("neon_empty_path_flags", default=())


def note_empty_paths(params: Sequence[Any], values: dict[str, Any], args: Sequence[str]) -> None:
    """Remember which Path options of the command line were given ``''`` (``-o ''``, ``--report=``).

    Called by :class:`neon_cli.commands._common.NeonCommand` once the words are parsed: typer turns
    a Path option's ``''`` into ``Path('.')``, the current folder, so only the words as typed tell.
    """
    flags = []
    for p in params:
        value = values.get(getattr(p, "name", None))
        if not any(isinstance(v, Path) for v in (value if isinstance(value, (list, tuple)) else [value])):
            continue
        opts = list(getattr(p, "opts", []) or [])
        if any((a in opts and i + 1 < len(args) and args[i + 1] == "") or any(a == f"{o}=" for o in opts if o.startswith("--"))
               for i, a in enumerate(args)):
            flags.append(_flag_name(p))
    _EMPTY.set(tuple(flags))


def empty_path_flags() -> list[str]:
    """The Path flags of the running command given an empty value (see :func:`note_empty_paths`)."""
    return list(_EMPTY.get())


def _flag_name(p: Any) -> str:
    opts = list(getattr(p, "opts", []) or [])
    if not opts:
        return str(getattr(p, "human_readable_name", p.name)).upper()
    longs = [o for o in opts if o.startswith("--")]
    return "-o" if "-o" in opts else (longs[0] if longs else opts[0])


def members(path: Path, role: str, *, write: bool = False) -> list[Entry]:
    """The files inside the folder ``path`` (recursively, symlinked folders not followed), each an
    Entry ``"<role> member"`` with ``member_of=role``; [] when ``path`` is not an existing folder."""
    out: list[Entry] = []
    if not os.path.isdir(path):
        return out
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append(Entry(f"{role} member", Path(root) / name, member_of=role))
            if len(out) >= MAX_MEMBERS:
                return out
    return out


def read(role: str, path: Any) -> list[Entry]:
    """A named input (file or folder, with its files); [] for None."""
    if path is None:
        return []
    p = Path(path)
    return [Entry(role, p), *members(p, role)]


def glob_reads(role: str, items: Iterable[Any]) -> list[Entry]:
    """Inputs that may be glob patterns (``--selftrained 'ft/*'``): each match, as
    :func:`neon_cli.tune.run.expand_checkpoints` expands it, with its files."""
    import glob

    out: list[Entry] = []
    for item in items or ():
        s = str(item)
        if not os.path.exists(s) and any(ch in s for ch in "*?["):
            for m in sorted(glob.glob(os.path.expanduser(s))):
                out += read(role, m)
        else:
            out += read(role, s)
    return out


def load_family(name: Optional[str]) -> Any:
    """The family object, or None when it cannot be loaded (the command itself then says why)."""
    if not name:
        return None
    try:
        from neon_cli.family import get_family

        return get_family(name)
    except Exception:
        return None


def model_reads(family: Any, path: Any, role: str) -> list[Entry]:
    """``path`` as input ``role``, or the family's embedded default when None (role
    ``"<role> (embedded default)"``)."""
    if path is not None:
        return read(role, path)
    default = getattr(family, "default_model", None) if family is not None else None
    return read(f"{role} (embedded default)", default) if default else []


def family_reads(family: Any, set_pairs: Sequence[str] = (), *, train: bool = False) -> list[Entry]:
    """What the family loads that the user did not name (:func:`neon_cli.family.files_read`)."""
    if family is None:
        return []
    from neon_cli.family import files_read, resolve_settings

    try:
        settings = resolve_settings(family, list(set_pairs or ()), train=train)
    except Exception:
        settings = {s.name: s.default for s in getattr(family, "settings", ())}
    out: list[Entry] = []
    try:
        found = files_read(family, settings)
    except Exception:
        found = []
    for role, p in found:
        out += read(f"family file ({role})", p)
    return out


def scoring_reads(detector: Any = None, ref_stats: Any = None, *, with_ref_stats: bool = True) -> list[Entry]:
    """The detector (``--detector`` or ``$NEON_INCEPTION``) and reference statistics
    (``--ref-stats`` or ``$NEON_REF_STATS``) a scoring run may read."""
    out: list[Entry] = []
    for flag, env, value in (("--detector", DETECTOR_ENV, detector),
                             ("--ref-stats", REF_STATS_ENV, ref_stats if with_ref_stats else None)):
        if value is not None and str(value) != "":
            out += read(flag, value)
        elif (flag != "--ref-stats" or with_ref_stats) and os.environ.get(env):
            out += read(f"${env}", os.environ[env])
    return out


def file_write(role: str, path: Any, *, lock: bool = False) -> list[Entry]:
    """A file output: itself, its temporary sibling ``.NAME.tmp-PID`` and, with ``lock``, its lock
    file ``.NAME.lock`` (:mod:`neon_cli.fsutil`); [] for None."""
    if path is None:
        return []
    p = Path(path)
    if str(path) == "":
        return []  # refused by name: see _build's empty
    out = [Entry(role, p), Entry(f"{role} temp", p.with_name(f".{p.name}.tmp-{os.getpid()}"), member_of=role)]
    if lock:
        out.append(Entry(f"{role} lock", p.with_name(f".{p.name}.lock"), member_of=role))
    return out


def folder_write(role: str, path: Any, names: Iterable[str] = ()) -> list[Entry]:
    """A folder output: the folder, every file already in it (a resumed run may rewrite them), the
    files ``names`` it will create, and its lock ``.neon.lock``."""
    if path is None:
        return []
    p = Path(path)
    out = [Entry(role, p, folder=True)]
    existing = {e.path for e in members(p, role)}
    planned = [p / n for n in names] + [p / ".neon.lock"]
    for f in list(existing) + [q for q in planned if q not in existing]:
        out.append(Entry(f"{role} member", f, member_of=role))
    return out


def _build(command: str, reads: list[Entry], writes: list[Entry], report: Any, empty: Sequence[str] = ()) -> Plan:
    """The plan; ``empty``: roles given an empty path besides those typer turned into ``.``
    (:func:`empty_path_flags`), refused by name."""
    writes = writes + file_write("--report", report)
    flags = list(dict.fromkeys([*empty_path_flags(), *empty, *(["--report"] if report is not None and str(report) == "" else [])]))
    problems_ = tuple((f, f"{f}: empty path; give a path") for f in flags)
    return Plan(command, tuple(_dedupe(reads)), tuple(_dedupe(writes)), problems_)


def _dedupe(entries: list[Entry]) -> list[Entry]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in entries:
        k = (e.role, str(e.path))
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


# --------------------------------------------------------------------------------------------
# one builder per command (the parsed options, as the CLI passes them to the library)


def synth_plan(*, family: str, model: Any, out: Any, num: int, shard_size: int, set_pairs: Sequence[str] = (),
               report: Any = None) -> Plan:
    """``neon synth``: reads ``--model`` (or the embedded default) and the family's files; writes
    ``-o`` with ``plan.json``, ``manifest.json`` and ``shard-%05d.safetensors`` for every shard."""
    fam = load_family(family)
    names = ["plan.json", "manifest.json"]
    try:
        if int(num) >= 1 and int(shard_size) >= 1 and -(-int(num) // int(shard_size)) <= MAX_MEMBERS:
            names += [f"shard-{k:05d}.safetensors" for k in range(-(-int(num) // int(shard_size)))]
    except (TypeError, ValueError):
        pass
    return _build("synth", model_reads(fam, model, "--model") + family_reads(fam, set_pairs),
                  folder_write("-o", out, names), report)


def finetune_plan(*, family: str, model: Any, data: Any, out: Any, set_pairs: Sequence[str] = (), report: Any = None) -> Plan:
    """``neon finetune``: reads ``--model``/default, the synthetic set ``--data`` (every shard and its
    manifest) and the family's files; writes ``-o`` with ``train_state.pt``, ``finetune.json`` and the
    snapshots (existing ones on resume), and for a family with an ``encode`` hook (VAR-style) its
    encoding cache (:func:`encoding_cache_writes`)."""
    fam = load_family(family)
    writes = folder_write("-o", out, ["train_state.pt", "finetune.json"])
    if callable(getattr(fam, "encode", None)) and callable(getattr(fam, "encode_key", None)):
        writes += encoding_cache_writes(data, out)
    return _build("finetune", model_reads(fam, model, "--model") + read("--data", data) + family_reads(fam, set_pairs, train=True),
                  writes, report)


def encoding_cache_writes(data: Any, out: Any) -> list[Entry]:
    """The encoding cache :func:`neon_cli.dataset.encoded_set` writes: ``encoded-<key>/`` inside
    ``--data`` (inside ``-o`` when ``--data`` is not writable). ``<key>`` needs the loaded model, so
    the plan lists the pattern ``encoded-*`` and every file of each existing ``encoded-*`` folder
    (a rerun may rewrite them), as writes ``member_of`` the folder's role: allowed inside that input
    (the one place a run writes into an input) while ``--report`` or another output on any of them
    is refused."""
    if data is None or str(data) == "" or not os.path.isdir(data):
        return []
    host, role = (Path(data), "--data") if os.access(data, os.W_OK) else (Path(out), "-o")
    if out is None and role == "-o":
        return []
    cache = f"{role} encoding cache"
    found = [e for d in sorted(host.glob("encoded-*")) if d.is_dir() for e in members(d, cache)]
    return [Entry(cache, host / "encoded-*", member_of=role)] + [
        Entry(f"{cache} member", e.path, member_of=role) for e in found]


def merge_plan(*, base: Any, selftrained: Any, outputs: Sequence[Any], shard_size: Any = None, report: Any = None) -> Plan:
    """``neon merge``: reads both checkpoints (every file of a folder) and θ_r's sidecar
    ``<base>.json``; writes each ``-o`` (a file with its temp, lock and sidecar, or a folder) and the report."""
    reads = read("base", base) + read("selftrained", selftrained)
    side = Path(str(base) + ".json") if base is not None else None
    has_side = side is not None and os.path.isfile(base) and side.is_file()
    if has_side:
        reads += read("base sidecar", side)
    writes: list[Entry] = []
    empty = []
    for o in outputs:
        role = "-o" if len(outputs) == 1 else f"-o ({o})"
        if str(o) == "":
            empty.append(role)
            continue
        p = Path(o)
        if shard_size or p.suffix.lower() not in _CHECKPOINT_SUFFIXES:
            writes += folder_write(role, p)
        else:
            writes += file_write(role, p, lock=True)
            if has_side:
                writes += file_write(f"{role} sidecar", Path(str(p) + ".json"))
    return _build("merge", reads, writes, report, empty)


def inspect_plan(*, checkpoint: Any, report: Any = None) -> Plan:
    """``neon inspect``: reads CHECKPOINT (every file of a folder); writes only the report."""
    return _build("inspect", read("CHECKPOINT", checkpoint), [], report)


def tune_plan(request: Any) -> Plan:
    """``neon tune-w`` (a :class:`neon_cli.requests.TuneRequest`): reads ``--base``/default, every
    ``--selftrained`` match (with ``--control`` also the ``finetune.json`` beside it: the recipe),
    ``--control`` when it is a checkpoint, the detector, reference statistics and the family's files;
    writes ``-o`` (lock), ``--cache`` (lock), ``--plot`` and the report."""
    family, base, selftrained, control = request.family, request.base, request.selftrained or (), request.control
    output, cache, plot, report = request.outputs.out, request.outputs.cache, request.outputs.plot, request.outputs.report
    detector, ref_stats, set_pairs = request.scoring.detector, request.scoring.ref_stats, request.set_pairs
    fam = load_family(family)
    reads = model_reads(fam, base, "--base") + glob_reads("--selftrained", selftrained)
    if control is not None and str(control) != "":  # the control's recipe: finetune.json beside each snapshot
        for e in [e for e in reads if e.role == "--selftrained"]:
            reads += read("--selftrained recipe (finetune.json)", e.path.parent / "finetune.json") \
                if (e.path.parent / "finetune.json").exists() else []
    if control is not None and str(control) not in ("", "real"):
        reads += read("--control", control)
    reads += scoring_reads(detector, ref_stats) + family_reads(fam, set_pairs)
    writes = file_write("-o", output, lock=True) + file_write("--cache", cache, lock=True) + file_write("--plot", plot)
    return _build("tune-w", reads, writes, report)


def eval_plan(*, family: str, model: Any, detector: Any = None, ref_stats: Any = None, set_pairs: Sequence[str] = (),
              report: Any = None) -> Plan:
    """``neon eval``: reads ``--model``/default, detector, reference statistics and the family's
    files (its classifier); writes only the report."""
    fam = load_family(family)
    return _build("eval", model_reads(fam, model, "--model") + scoring_reads(detector, ref_stats) + family_reads(fam, set_pairs),
                  [], report)


def fid_plan(*, a: Any, b: Any, detector: Any = None, report: Any = None) -> Plan:
    """``neon fid``: reads A and B (every file of a folder) and the detector; writes only the report."""
    return _build("fid", read("A", a) + read("B", b) + scoring_reads(detector, with_ref_stats=False), [], report)


def refstats_plan(*, images: Any, out: Any, detector: Any = None, report: Any = None) -> Plan:
    """``neon ref-stats``: reads ``--images`` and the detector; writes ``-o`` and the report."""
    return _build("ref-stats", read("--images", images) + scoring_reads(detector, with_ref_stats=False),
                  file_write("-o", out, lock=True), report)


def export_plan(*, data: Any, out: Any, report: Any = None) -> Plan:
    """``neon export``: reads DATA (the synthetic set's manifest and shards); writes ``-o`` (lock) and the report."""
    return _build("export", read("DATA", data), file_write("-o", out, lock=True), report)


def demo_plan(*, family: str, base: Any, out: Any, report: Any = None) -> Plan:
    """``neon demo``: reads ``--base``/default, the family's files and ``$NEON_INCEPTION`` /
    ``$NEON_REF_STATS`` (an image family scores with them); writes ``-o`` (S, theta_s, the
    control, the merged model, caches: every file already there on a rerun) and the report."""
    fam = load_family(family)
    return _build("demo", model_reads(fam, base, "--base") + family_reads(fam) + scoring_reads(), folder_write("-o", out), report)


def align_plan(*, family: str, base: Any, selftrained: Any = None, synthetic: Any = None, real: Any = None,
               set_pairs: Sequence[str] = (), report: Any = None) -> Plan:
    """``neon align``: reads ``--base``/default, ``--selftrained``, ``--synthetic``, ``--real`` and the
    family's files; writes only the report."""
    fam = load_family(family)
    reads = (model_reads(fam, base, "--base") + read("--selftrained", selftrained) + read("--synthetic", synthetic)
             + read("--real", real) + family_reads(fam, set_pairs, train=True))
    return _build("align", reads, [], report)


def plugins_plan(*, report: Any = None) -> Plan:
    """``neon plugins``: reads no file; writes only the report."""
    return _build("plugins", [], [], report)
