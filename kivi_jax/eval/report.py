"""Result files of the evaluations: run metadata, file names, JSON and markdown writing."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import subprocess


def _git(*args) -> str | None:
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata() -> dict:
    """commit, device, versions, date: what a result needs to be reproduced."""
    import flax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    if dev.platform == "cpu":
        kind = f"{_cpu_name()} ({os.cpu_count()} cores)"
    # KIVI_COMMIT names the tree that ran where git cannot: a copy of a working tree whose .git is
    # another commit's (the device machine's; run118's files said the session's first commit)
    given = os.environ.get("KIVI_COMMIT")
    return {
        "commit": given or _git("rev-parse", "HEAD"),
        "dirty_tracked_files": None if given else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {kind}",
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
    }


def model_tag(source: str) -> str:
    """Short name for file names: 'smollm2' for the packaged model, else the path's last part
    (less a .gguf suffix), lower-cased, other characters than [a-z0-9_.-] as '-'."""
    s = str(source)
    # the name only, and the whole last part: any source starting "smollm2" (SmolLM2-360M.gguf) was
    # tagged "smollm2", and Path.stem made Llama-3.1-8B and Llama-3.2-1B both "llama-3": one
    # model's result files overwrote another's
    if s.lower() == "smollm2-135m":
        return "smollm2"
    name = pathlib.Path(s.rstrip("/")).name
    if name.lower().endswith(".gguf"):
        name = name[:-len(".gguf")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.").lower() or "model"


def result_paths(out_dir, bench: str, source: str, date: str | None = None,
                 dtype: str = "float32") -> dict[str, pathlib.Path]:
    """{json, md, png}: out_dir/<bench>-<model>-<YYYY-MM-DD>.<ext>, or <bench>-<model>-<dtype>-<date>
    for a dtype other than the default float32 (a bfloat16 run of the same day overwrote the
    float32 one's files)."""
    date = date or datetime.date.today().isoformat()
    base = f"{bench}-{model_tag(source)}{'' if dtype == 'float32' else '-' + dtype}-{date}"
    # not with_suffix: it took a tag's dot for a suffix (ppl-smollm2-360m-instruct.q8_0-<date>
    # became ppl-smollm2-360m-instruct.json, the date lost)
    return {ext: pathlib.Path(out_dir) / f"{base}.{ext}" for ext in ("json", "md", "png")}


def write_json(path, obj) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
