"""WRM's certificate against the Wasserstein attack across γ and ρ, on Fashion-MNIST test points.

For the `full` preset's WRM model (loaded from, or trained into, ``--cache``) and each γ, prints
the certificate ``γρ + E[φ_γ]`` at the transport cost ``ρ̂`` the ``--steps`` ascent reaches and at each
``--rhos`` budget, beside the mean loss the Wasserstein attack (``--attack-steps`` ascents with
restarts, multipliers searched so that its mean cost fills the budget) reaches within the same
budget, and the Lagrangian gap ``E[φ_γ(attack)] − E[φ_γ(ascent)]`` (how far the certificate's ascent is
from the supremum the certificate assumes; > 0: the ascent missed it).  Claim checked (Sinha,
Namkoong & Duchi 2018, Proposition 1): the certificate is never below the attack; it may fail for γ
below the loss's smoothness constant, where the inner problem is not concave.

    python scripts/bench_wrm.py --cache /path/to/full/models --n 100 --gammas 0.12 0.486 1.94 --rhos 0.25 1 4
"""

from __future__ import annotations

import time
from pathlib import Path

from bench_common import environment, parse, parser, preset_model

from robustbench_lite.eval.wasserstein import wasserstein_certificate


def main() -> None:
    p = parser(__doc__, n=100)
    p.add_argument("--cache", type=Path, required=True, help="model cache of the full preset (trained there if missing)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.12, 0.486, 1.94])
    p.add_argument("--rhos", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    p.add_argument("--steps", type=int, default=15, help="the certificate's ascent steps (the paper's T_adv = 15)")
    p.add_argument("--attack-steps", type=int, default=50)
    p.add_argument("--restarts", type=int, default=2)
    args = parse(p)
    fixture = preset_model("wrm", args.cache)
    x, y = fixture.data.test.x[: args.n], fixture.data.test.y[: args.n]
    print(f"{fixture.describe()}; first {args.n} test points; CE loss; certificate ascent {args.steps} steps; "
          f"attack {args.attack_steps} steps x {args.restarts} restarts; {environment()}; {time.strftime('%Y-%m-%d')}")
    print(f"{'gamma':>7}{'rho_hat':>9}{'E phi':>8}{'cert@rho_hat':>13}{'attack@rho_hat':>16}{'phi gap':>9}"
          f"{'rho':>6}{'cert@rho':>10}{'attack@rho':>16}{'holds':>7}{'cpu_s':>7}")
    runs: dict = {}  # the attack's runs by multiplier, shared by every gamma and rho (same points)
    for g in args.gammas:
        for rho in args.rhos:
            t0 = time.process_time()
            c = wasserstein_certificate(fixture.model, x, y, gamma=g, rho=rho, steps=args.steps,
                                        attack_steps=args.attack_steps, restarts=args.restarts, seed=args.seed,
                                        batch_size=args.n, attack_runs=runs)
            print(f"{g:>7.3f}{c.rho_hat:>9.3f}{c.phi:>8.3f}{c.bound_at_rho_hat:>13.4f}"
                  f"{c.attack_at_rho_hat[0]:>10.4f}@{c.attack_at_rho_hat[1]:<5.3f}{c.attack_phi - c.phi:>9.4f}"
                  f"{rho:>6.2f}{c.bound_at_rho:>10.3f}{c.attack_at_rho[0]:>10.3f}@{c.attack_at_rho[1]:<5.3f}"
                  f"{'yes' if c.holds else 'NO':>7}{time.process_time() - t0:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
