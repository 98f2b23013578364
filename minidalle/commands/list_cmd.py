"""`minidalle list [KIND] [--json]`: registered components and failed plugins."""
from __future__ import annotations

import json


def add_parser(sub):
    from minidalle.plugin.hookspecs import KINDS

    p = sub.add_parser("list", help="list registered components and plugin errors")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from minidalle.plugin.discovery import get_registry

    registry = get_registry()
    rows = []
    for c in registry.components(args.kind):
        reason = registry.conflict(c.kind, c.name) or c.unavailable_reason(deep=True)  # cheap by contract
        rows.append({
            "kind": c.kind, "name": c.name, "provider": c.provider, "version": c.version,
            "available": reason is None, "reason": reason or "", "summary": c.summary,
        })
    failures = [{"plugin": f.plugin, "provider": f.provider, "error": f.error}
                for f in registry.failures]
    if args.json:
        print(json.dumps({"components": rows, "failed_plugins": failures}, indent=2))
        return 0
    widths = [max([len(h)] + [len(str(r[k])) for r in rows]) for h, k in
              (("KIND", "kind"), ("NAME", "name"))]
    prov = [f"{r['provider']} {r['version']}".strip() for r in rows]
    pw = max([len("PROVIDER")] + [len(p) for p in prov])
    print(f"{'KIND':<{widths[0]}}  {'NAME':<{widths[1]}}  {'PROVIDER':<{pw}}  STATUS       SUMMARY")
    for r, p in zip(rows, prov):
        status = "available" if r["available"] else "unavailable"
        line = f"{r['kind']:<{widths[0]}}  {r['name']:<{widths[1]}}  {p:<{pw}}  {status:<11}  {r['summary']}"
        if not r["available"]:
            line += f" [{r['reason']}]"
        print(line)
    if failures:
        print("\nFailed plugins:")
        for f in failures:
            print(f"  {f['plugin']} ({f['provider']}): {f['error']}")
    return 0
