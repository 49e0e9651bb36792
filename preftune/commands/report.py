"""``preftune report RUN_DIR``: write the self-contained HTML page of :mod:`preftune.report`."""

from __future__ import annotations

from .options import Positional, build_parser, parse_options

__all__ = ["build_report_parser", "cmd_report"]


def build_report_parser():
    from ..config import ReportArguments

    return build_parser(
        "preftune report",
        "Write RUN_DIR/report.html: one self-contained page with the training curves, configuration, "
        "final metrics, and (after `preftune eval`) evaluation metrics and sample generations. Opens in any browser, no server.",
        (ReportArguments,),
        (Positional("run_dir", "RUN_DIR", "output folder of `preftune train`"),),
    )


def cmd_report(argv: list[str]) -> int:
    from ..report import write_report

    report_args, where = parse_options(build_report_parser(), argv, "report")
    out = write_report(where.run_dir, report_args.output, report_args.max_generations)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1024:.0f} KB, self-contained: open it in any browser)")
    return 0
