"""Driving one prediction: accept it (`service`), run it through its steps
(`runner`), one upstream attempt at a time (`attempts`, `polling`, `hedging`),
and turn a completed job into what the client gets (`outputs`)."""
