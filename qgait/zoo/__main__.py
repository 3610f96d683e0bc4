"""``python -m qgait.zoo list | show NAME | verify [NAME ...] | add NAME MODEL_FILE --card CARD``."""
from __future__ import annotations

import argparse
import sys

from qgait import zoo
from qgait.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qgait.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="zoo folder (default: the installed package's, or "
                                 "QGAIT_ZOO_DIR)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the shipped models")
    s = sub.add_parser("show", help="a model's card")
    s.add_argument("name")
    v = sub.add_parser("verify", help="checksums, safe load and reference embedding")
    v.add_argument("names", nargs="*", help="default: every shipped model")
    a = sub.add_parser("add", help="add a model file (qgait convert / model_io.save_model)")
    a.add_argument("name")
    a.add_argument("model_file")
    a.add_argument("--card", required=True, help="the model card (markdown)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            names = zoo.list_models(args.dir)
            if not names:
                print(f"no models shipped in {zoo._dir(args.dir)}")
            for n in names:
                e = zoo._entry(n, args.dir)
                print(f"zoo:{n:<30s} {e['kind']:<10s} {e['bytes']:>10,d} bytes")
        elif args.cmd == "show":
            print(zoo.card(args.name, args.dir))
        elif args.cmd == "verify":
            for n in args.names or zoo.list_models(args.dir):
                r = zoo.verify(n, args.dir)
                print(f"zoo:{n}: ok ({r['kind']}, reference embedding within "
                      f"{r['max_rel_diff']:.1e})")
        else:
            e = zoo.add(args.name, args.model_file, args.card, args.dir)
            print(f"added zoo:{e['name']} ({e['kind']}, {e['bytes']:,d} bytes, "
                  f"sha256 {e['sha256'][:16]}...)")
    except UserError as e:   # a zoo name, a checksum, an unreadable model file
        print(f"python -m qgait.zoo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
