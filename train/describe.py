"""Ask an OpenAI-compatible chat endpoint for each class's core visual features (for DRM).

    python -m train.describe --folder data/train --url http://127.0.0.1:8080/v1 --model llama3
    python -m train.describe --classes names.txt --url http://localhost:11434/v1 --model qwen2.5 --out desc.json

Works with any server speaking the OpenAI chat-completions API (llama.cpp's server,
vLLM, Ollama, ...). The API key, if the server needs one, is read from the environment
variable named by ``--api-key-env`` (default ``OPENAI_API_KEY``) and never written to a
file. Results are cached as JSON (``core_descriptions.json`` next to the dataset), one
description per class; classes already cached are not asked again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from radapter.atomic import atomic_path
from radapter.errors import RAdapterError

CACHE_NAME = "core_descriptions.json"
PROMPT = (
    "In one sentence of at most 30 words, describe the core visual features of {article} {name}: the shape, "
    "parts, colours and texture of the object itself, not its usual background, context or surroundings. "
    "Answer with the description only."
)


def cache_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / CACHE_NAME


def load_cached(path: str | Path) -> dict[str, str] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RAdapterError(f"{path} is not valid JSON; delete it to ask again") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RAdapterError(f"{path} should map class names to description strings")
    return data


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def ask(name: str, url: str, model: str, api_key: str | None, timeout: float = 120.0) -> str:
    """One chat-completions request; returns the description text."""
    body = json.dumps({
        "model": model,
        "messages": [
            {"role": "system", "content": "You describe what objects look like, precisely and briefly."},
            {"role": "user", "content": PROMPT.format(article=_article(name), name=name)},
        ],
        "temperature": 0.0,
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RAdapterError(f"{url} answered HTTP {e.code} for {name!r}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise RAdapterError(f"cannot reach the chat endpoint {url} ({getattr(e, 'reason', e)})") from None
    except json.JSONDecodeError:
        raise RAdapterError(f"{url} did not answer with JSON") from None
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RAdapterError(f"{url} answered without choices[0].message.content") from None
    text = " ".join(str(text).split()).strip().strip('"')
    if not text:
        raise RAdapterError(f"{url} returned an empty description for {name!r}")
    return text


def describe_classes(classnames: list[str], out: str | Path, url: str, model: str, *,
                     api_key_env: str = "OPENAI_API_KEY", force: bool = False) -> dict[str, str]:
    """Describe every class not yet in the cache file ``out``; saves after each answer (atomically)."""
    if not classnames:
        raise RAdapterError("no class names to describe")
    cached = {} if force else (load_cached(out) or {})
    api_key = os.environ.get(api_key_env)
    for name in classnames:
        if name in cached:
            continue
        cached[name] = ask(name, url, model, api_key)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(cached, indent=2, ensure_ascii=False))
    return {n: cached[n] for n in classnames}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="an ImageFolder dataset: classes are its sub-folders; cache goes inside it")
    src.add_argument("--classes", help="a file with one class name per line")
    p.add_argument("--url", required=True, help="base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", required=True, help="model name the server expects")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", default=None, help=f"cache file (default: <folder>/{CACHE_NAME} or next to --classes)")
    p.add_argument("--force", action="store_true", help="ask again for every class")
    args = p.parse_args(argv)
    try:
        if args.folder:
            folder = Path(args.folder)
            if not folder.is_dir():
                raise RAdapterError(f"dataset folder not found: {folder}")
            names = sorted(d.name for d in folder.iterdir() if d.is_dir())
            out = Path(args.out) if args.out else cache_path(folder)
        else:
            path = Path(args.classes)
            if not path.is_file():
                raise RAdapterError(f"class-name file not found: {path}")
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            out = Path(args.out) if args.out else path.with_name(CACHE_NAME)
        result = describe_classes(names, out, args.url, args.model, api_key_env=args.api_key_env, force=args.force)
    except RAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, text in result.items():
        print(f"{name}: {text}")
    print(f"cached in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
