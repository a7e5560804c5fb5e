"""`mds params`: total and activated parameter counts of a preset."""

import json

from megatron_ds.config import load_config
from megatron_ds.model.size import parameter_counts


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="print total and activated-per-token parameter counts")
    p.add_argument("--preset", required=True, help="preset name (see megatron_ds/presets)")
    p.add_argument("--config", help="YAML file applied over the preset")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4")
    p.set_defaults(func=run)


def _billions(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def run(args) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)
    c = parameter_counts(cfg.model)
    if args.json:
        print(json.dumps(c.as_dict(), indent=2))
        return 0
    rows = [
        ("main model, total", c.main_total, c.main_activated),
        ("  of which embedding", c.embedding, c.embedding),
        ("  of which output head", c.head, c.head),
        ("MTP modules (own weights)", c.mtp_total, c.mtp_activated),
        ("with MTP + its embedding/head copies", c.main_total + c.mtp_total + c.embedding + c.head,
         c.main_activated + c.mtp_activated + c.embedding + c.head),
    ]  # fmt: skip
    print(f"{args.preset}: {'':28} {'total':>10} {'activated/token':>16}")
    for name, total, activated in rows:
        print(f"  {name:38} {_billions(total):>10} {_billions(activated):>16}")
    return 0
