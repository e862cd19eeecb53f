"""Differential privacy for ktfed sites: DP-SGD (Opacus), accounting, the site's privacy ledger,
and user-level clipping and noise for DP-FedAvg.

This package wraps whatever torch model and optimizer it is handed: it knows nothing of ktfed's
models, the wire or the services (see DESIGN.md's layering).

    accounting     epsilon of a history of (sample rate, noise multiplier, steps), PRV primary and
                   RDP cross-check, and the noise multiplier for a target epsilon
    ledger         the site's own SQLite ledger: one row per training round, cumulative epsilon
                   composed from the whole history, and the budget check that stops training
    grad_samplers  per-sample gradient rules (Opacus `hooks` mode) for custom linear adapters
    engine         DP-SGD: train_dp runs kt_core.train's loop with Poisson sampling, per-sample
                   clipping and noise; make_private does the same for a loop of the caller's own
    user_level     whole-update clipping, central Gaussian noise and distributed noise shares
"""
from security.dp.accounting import (ACCOUNTANTS, AccountingError, RoundSpend, accountant_version, epsilon,
                                    epsilons, noise_multiplier_for)
from security.dp.ledger import BudgetExceeded, LedgerEntry, PrivacyLedger

__all__ = ["ACCOUNTANTS", "AccountingError", "RoundSpend", "accountant_version", "epsilon", "epsilons",
           "noise_multiplier_for", "BudgetExceeded", "LedgerEntry", "PrivacyLedger"]
