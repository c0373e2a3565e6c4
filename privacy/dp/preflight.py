"""Privacy terms that cannot mean anything fail at start, not as a run of refusals.

Three checks, each where the values first meet (a simulation before Ray starts, a
partner's site when it joins):

* δ must be below 1/n for a holder of n records: at δ ≥ 1/n a mechanism that publishes
  one record in the clear is (0, δ)-DP, so the ε beside it protects nothing.
* A model Opacus cannot make private (BatchNorm mixes records of a batch, so per-example
  gradients do not exist) is refused with Opacus's own reasons (`ModuleValidator`).
* An explicit σ with which not even one round fits the budget: every request would be
  refused and the run would train nothing.
"""

from __future__ import annotations

import warnings

import torch

from consortia.privacy.dp.accounting import epsilon_for, noise_for_budget, round_steps


def check_delta(delta: float, records: int, who: str) -> None:
    """`who` holds `records` records; δ must be below 1/records."""
    if records > 0 and delta >= 1.0 / records:
        raise ValueError(
            f"delta = {delta:g} is not below 1/n for {who}'s {records} records (1/n = "
            f"{1.0 / records:.3g}): at such a δ, publishing one record in the clear is "
            f"(0, δ)-DP, so ε protects nothing; accepted: delta < 1/n, commonly at most "
            f"1/n^1.1 (here {records ** -1.1:.2g})")


def check_dp_model(model: torch.nn.Module, what: str,
                   without_dp: str = "privacy.enabled = false") -> None:
    """Opacus must be able to compute per-example gradients of `model`. `without_dp` is
    the setting that trains without DP where the check is made (a run's, a site's)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(sorted({str(e) for e in errors}))
        raise ValueError(
            f"{what}'s model cannot be trained with DP: {reasons}. Replace those layers "
            "(BatchNorm by GroupNorm or LayerNorm: Opacus's ModuleValidator.fix does it), or "
            f"train without DP ({without_dp})")


def check_first_round(*, noise_multiplier: float, records: int, batch_size: int,
                      local_epochs: int, mode: str, epsilon_budget: float, delta: float,
                      accountant: str, who: str) -> None:
    """With an explicit σ, one round must fit the budget, or the client never trains."""
    rate, steps = round_steps(records, batch_size, local_epochs, mode)
    with warnings.catch_warnings():  # Opacus's note that a larger RDP order would be tighter
        warnings.simplefilter("ignore", UserWarning)
        spent = epsilon_for(accountant, [(noise_multiplier, rate, steps)], delta)
    if spent > epsilon_budget:
        least = noise_for_budget(epsilon_budget, delta, rate, steps, accountant)
        raise ValueError(
            f"privacy.noise_multiplier = {noise_multiplier:g}: one round costs {who} "
            f"ε = {spent:.3g} ({steps} steps at rate {rate:.3g}), above privacy.epsilon_budget"
            f" = {epsilon_budget:g}, so it could never train; accepted: σ ≥ {least:.3g} "
            "(one round fits), or leave it unset to derive σ from the budget")


def check_budget_reachable(*, records: int, batch_size: int, local_epochs: int, mode: str,
                           rounds: int, epsilon_budget: float, delta: float, accountant: str,
                           who: str) -> None:
    """With σ derived from the budget, some σ must fit the planned rounds: Opacus's search
    gives up at its MAX_SIGMA, which the clients would find out at their first request."""
    from opacus.accountants.utils import MAX_SIGMA

    rate, steps = round_steps(records, batch_size, local_epochs, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        least = epsilon_for(accountant, [(MAX_SIGMA, rate, steps * rounds)], delta)
    if least > epsilon_budget:
        raise ValueError(
            f"privacy.epsilon_budget = {epsilon_budget:g} cannot be met by {who}: {rounds} "
            f"planned rounds of {steps} steps at rate {rate:.3g} spend ε = {least:.3g} even "
            f"at σ = {MAX_SIGMA:g}; accepted: a larger budget, fewer rounds, or a smaller "
            "batch_size")


def partial_fit_warning(*, noise_multiplier: float, records: int, batch_size: int,
                        local_epochs: int, mode: str, rounds: int, epsilon_budget: float,
                        delta: float, accountant: str, who: str) -> str | None:
    """With an explicit σ that fits one round (check_first_round), how many of the
    `rounds` planned rounds fit the budget; a warning when not all of them do (None when
    they do). A choice a run may make (the client refuses once its budget is spent), so
    said at start rather than refused: otherwise it shows only as refusals late in the run."""
    rate, steps = round_steps(records, batch_size, local_epochs, mode)

    def fits(r: int) -> bool:
        return epsilon_for(accountant, [(noise_multiplier, rate, steps * r)], delta) \
            <= epsilon_budget

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if fits(rounds):
            return None
        low, high = 1, rounds  # fits(low) (check_first_round), not fits(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    least = noise_for_budget(epsilon_budget, delta, rate, steps * rounds, accountant)
    return (f"privacy.noise_multiplier = {noise_multiplier:g} fits privacy.epsilon_budget = "
            f"{epsilon_budget:g} for only {low} of {who}'s {rounds} planned rounds ({steps} "
            f"steps at rate {rate:.3g} each): from its round {low + 1} on it refuses. For all "
            f"{rounds}: σ ≥ {least:.3g}, or leave σ unset to derive it from the budget")
