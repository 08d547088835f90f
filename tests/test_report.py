"""``python -m recsys.report``: the headline lines of training reports, retriever reports and cascade summaries."""

from __future__ import annotations

import json

from recsys.report import format_report, main


def test_retriever_report_shows_recall_and_the_early_stop():
    report = {"valid_recall@10": 0.25, "valid_recall_catalog": 5000, "steps": 60, "test_auc": 0.7,
              "config": {"model": {"arch": "two_tower"}},
              "early_stopping": {"metric": "valid_recall@10", "best_step": 40, "stopped_at_step": 60}}
    text = format_report(report)
    assert text.startswith("retriever training (two-tower)")
    assert "0.2500" in text and "5000" in text and "best at step 40, stopped at step 60" in text
    assert "AUC" not in text  # a retriever's candidate AUC is not its headline


def test_sid_decoder_report_names_its_beam_search():
    report = {"valid_recall@10": 0.125, "valid_recall_catalog": 1682, "valid_beam_certified": 0.5, "steps": 9,
              "config": {"model": {"arch": "sid_decoder"}}}
    text = format_report(report)
    assert text.startswith("retriever training (SID decoder)")
    assert "beam-search top 10" in text and "0.1250" in text and "certified exact" in text and "0.5000" in text


def test_cascade_summary_lists_recall_and_each_retriever_alone(tmp_path):
    summary = {"mode": "cascade", "requests": 3, "requests_per_s": 10.0,
               "metrics": {"hr@10": 0.3, "ndcg@10": 0.2, "recall@100_two_tower": 0.6, "recall@100_union": 0.6,
                           "hr@10_two_tower": 0.25, "ndcg@10_two_tower": 0.15, "targets": 9}}
    text = format_report(summary)
    for key in ("HR@10", "recall@100_two_tower", "recall@100_union", "hr@10_two_tower", "ndcg@10_two_tower"):
        assert key in text, key
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert main([str(path)]) == 0 and main([str(tmp_path / "missing.json")]) == 2
