"""Who may spend and how much: client keys (`auth`, `keyspec`), budgets reserved
before every upstream submit (`budgets`), and spend reports (`spend_report`)."""
