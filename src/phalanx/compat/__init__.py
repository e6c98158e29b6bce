"""Front doors for the five systems phalanx replaces: change the import, keep the code.

One small module per system, each exposing that system's documented names on top of phalanx's
public API only: `phalanx.compat.ddpw`, `.pystematic`, `.pytagi`, `.poptorch`, `.mpify`.
"""
