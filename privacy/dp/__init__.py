"""Sample-level DP: Opacus accountants and the client's privacy ledger."""

from consortia.privacy.dp.accounting import epsilon_for, new_accountant, noise_for_budget, round_steps
from consortia.privacy.dp.ledger import BudgetDecision, LedgerMismatchError, PrivacyLedger

__all__ = ["BudgetDecision", "LedgerMismatchError", "PrivacyLedger", "epsilon_for",
           "new_accountant", "noise_for_budget", "round_steps"]
