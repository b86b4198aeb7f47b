"""Built-in defenses (training recipes), one per module; each registers with ``@register_defense``."""
