import sys

from server.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
