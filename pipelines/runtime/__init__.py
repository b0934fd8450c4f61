"""What every command needs before its own work: Ray started the same way everywhere
(``cluster``), its inputs resolved: the model checkpoint and a generated catalog (``inputs``), and
torch's threads sized to a Ray worker's CPU reservation (``threads``)."""
