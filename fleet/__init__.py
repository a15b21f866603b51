"""The operator side: model registry, device state, signed releases and rollouts over MQTT."""
