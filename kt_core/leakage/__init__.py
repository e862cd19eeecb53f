"""Empirical leakage tests: what an attacker who sees a site's update can learn, measured.

Pure torch / numpy (no services, no crypto): the secure-aggregation sum and the DP accountant are
handed in by the caller (`ktfed audit attack` passes the project's own).

  metrics     PSNR, SSIM, best-match scoring of reconstructions; ROC AUC, TPR at low FPR
  inversion   analytic inversion of a fully connected layer; cosine gradient inversion (Geiping et al.)
  one_run     the one-run epsilon lower bound with canaries (Steinke, Nasr, Jagielski 2023)
  scenario    data, models, the conditions, and the update a site sends under each
  suite       every attack against every condition, side by side: run_suite, format_table
"""
from kt_core.leakage.metrics import best_match, psnr, roc_auc, ssim, tpr_at_fpr
from kt_core.leakage.one_run import audit, epsilon_lower_bound, p_value
from kt_core.leakage.scenario import CONDITIONS, Condition
from kt_core.leakage.suite import SuiteResult, SuiteSettings, format_table, run_suite

__all__ = ["best_match", "psnr", "roc_auc", "ssim", "tpr_at_fpr", "audit", "epsilon_lower_bound", "p_value",
           "CONDITIONS", "Condition", "SuiteResult", "SuiteSettings", "format_table", "run_suite"]
