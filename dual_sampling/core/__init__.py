"""The jobs' core: sampling (the job, the per-token coordinator, the transports) and scoring
(tokenise, plan and score groups of completions)."""
