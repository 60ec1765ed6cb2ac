"""The paper experiment's code paths at toy scale, offline: a small base model without a chat template, toy
mirrors of the paper's datasets and toy lm-eval tasks under the paper's names (`fixtures.build_rehearsal_fixtures`)."""
