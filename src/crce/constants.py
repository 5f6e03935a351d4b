"""The study's constants every stage shares (paper, section 4 and Table 1)."""

from __future__ import annotations

from typing import Literal, get_args

Category = Literal["object", "ip", "celebrity"]
CATEGORIES = get_args(Category)  # Table 1's column groups, in its order
LIST_LENGTH = 15  # corefs and retains per concept (paper: 15 + 15)
N_TRAIN, N_TEST = 10, 5  # the paper's split of each list
# The judge's readable answers; anything else is recorded as invalid and counted apart.
ANSWERS = ("yes", "no")
# The groups of a concept's prompts, in Table 1's column order.
GROUPS = ("target", "coref_train", "coref_test", "retain_train", "retain_test")
# Table 1's metric of each group: the share of images the judge says show the prompt's concept.
METRICS = {
    "target": "Acc_U",
    "coref_train": "Acc_C_train",
    "coref_test": "Acc_C_test",
    "retain_train": "Acc_R_train",
    "retain_test": "Acc_R_test",
}
LIST_PROMPT_VERSION = "appendix-a-v1"  # the LLM prompt for the lists (crce.llm)
# Bumped whenever the trainer computes something else for the same settings. It enters the
# erase rules' params and every checkpoint, so results of an older trainer are never reused.
#   1: initial; 2: the UNet timestep is the official 1000-step schedule index
#   (`scheduler.timesteps[int(i/50*1000)]`, srcs/ours_tools.py of the CRCE code), i ~
#   U{1..ddim_steps-2}, randomness per (seed, concept, iteration), official sphere/RealEra.
TRAINER_VERSION = 2
LLM_ANCHORS = "llm"  # a method's `anchors` value that asks the LLM (crce.anchors)
