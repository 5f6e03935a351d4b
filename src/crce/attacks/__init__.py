"""Erasure under attack (`snakemake attacks`): prompts searched to bring an erased concept
back, judged as the target's own images, with UnlearnDiffAtk's pre-ASR and ASR
(`crce.attacks.asr`).

- `ring_a_bell`: Ring-A-Bell's genetic search on the base model's text encoder; its prompts
  are model-agnostic, so one search per concept serves every method (rules `ring_a_bell_pairs`,
  `ring_a_bell`, then `sample_attack` per method).
- `unlearndiffatk`: UnlearnDiffAtk's prefix optimised against each erased UNet (white-box: one
  attack per method and concept, opt-in; rules `unlearndiffatk`, `judge_uda`).
"""


class AttackError(ValueError):
    """An attack's input that cannot be used, named."""
