#!/usr/bin/env python3
"""Pages through the RESO Member and Property collections with flex-mls.

    PY=$(scripts/flexmls-venv.sh)
    "$PY" tests/flexmls/page_all.py [--top N] BASE_URL TOKEN

BASE_URL is a RESO Web API base such as http://127.0.0.1:9001/Reso/OData
(flex-mls's own default is https://replication.sparkapi.com/Version/3/Reso/OData),
TOKEN what flex-mls sends as ``Authorization: Bearer TOKEN``: a Spark access
token, or a credproxy session key when BASE_URL is credproxy's.

flex-mls asks for ``BASE_URL/Member?$top=N`` (``$`` sent as ``%24``), then
follows each page's ``@odata.nextLink`` as the absolute URL it is, until a
page has none; the same for Property. On success it prints one JSON line:
{"members": RECORDS, "member_pages": PAGES, "properties": ..., "property_pages": ...}
and exits 0. Any error (HTTP, network, a page limit exceeded) is described on
stderr and the exit status is 1 (2 for bad arguments or flex-mls missing).
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", help="RESO Web API base URL, e.g. http://127.0.0.1:9001/Reso/OData")
    parser.add_argument("token", help="sent as Authorization: Bearer TOKEN")
    parser.add_argument("--top", type=int, default=10, help="page size ($top), 1 to 1000 (default 10)")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="flex-mls retries of 429/5xx and network errors (default: flex-mls's own, 3)",
    )
    parser.add_argument(
        "--max-pages",
        type=int,
        default=10000,
        help="give up (exit 1) after this many pages of one collection (default 10000)",
    )
    args = parser.parse_args()

    try:
        from flex_mls import FlexMlsClient
        from flex_mls.exceptions import ApiError
    except ImportError as exc:
        print(f"page_all: flex-mls is not installed here ({exc}); use scripts/flexmls-venv.sh", file=sys.stderr)
        return 2

    options = {}
    if args.max_retries is not None:
        options["max_retries"] = args.max_retries
    client = FlexMlsClient(access_token=args.token, base_url=args.base_url, **options)

    result: dict[str, int] = {}
    try:
        for name, pages_key, resource in (
            ("members", "member_pages", client.members),
            ("properties", "property_pages", client.properties),
        ):
            records = 0
            pages = 0
            # iter_all yields ODataPage objects: .records (the "value" list),
            # .next_link, .count, .raw.
            for page in resource.iter_all(top=args.top):
                pages += 1
                records += len(page.records)
                if pages > args.max_pages:
                    print(f"page_all: {name}: more than {args.max_pages} pages; last next link {page.next_link}", file=sys.stderr)
                    return 1
            result[name] = records
            result[pages_key] = pages
    except ApiError as exc:
        print(
            f"page_all: {type(exc).__name__}: {exc} (HTTP {exc.status_code}, Spark code {exc.spark_code})",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
        print(f"page_all: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
