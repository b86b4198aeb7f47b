"""Built-in attacks, one per module; each registers itself with ``@register_attack``."""
