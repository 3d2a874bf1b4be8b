"""The search of every layer's (p, b) (section 3.2) and the accuracy budget over its results: the GP-EI core
(`gp`), a layer's log (`log`), the job every executor runs (`job`, with `subset_eval`), the executors (`local`,
`ray_executor`), the plots, the whole command (`driver`) and the budget's plans (`budget`)."""
