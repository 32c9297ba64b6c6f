"""`make bench`: every benchmark, each printed as a table. Ratios are measured side by side
in one run, because the machines are shared and absolute numbers drift."""

from __future__ import annotations

import argparse

from bench import (
    answers,
    audit,
    auth,
    embedders,
    generators,
    guard_latency,
    guardrails,
    ingestion,
    judge_lag,
    judges,
    monitoring,
    qa,
    reliability,
)

BENCHES = {
    "ingestion": ingestion.main,
    "qa": qa.main,
    "audit": audit.main,
    "auth": auth.main,
    "guardrails": guardrails.main,
    "guard_latency": guard_latency.main,
    "judges": judges.main,
    "judge_lag": judge_lag.main,
    "reliability": reliability.main,
    "embedders": embedders.main,
    "answers": answers.main,
    "generators": generators.main,
    "monitoring": monitoring.main,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", choices=[*BENCHES, []], help="run only these")
    args = parser.parse_args()
    for name, fn in BENCHES.items():
        if not args.only or name in args.only:
            fn()


if __name__ == "__main__":
    main()
