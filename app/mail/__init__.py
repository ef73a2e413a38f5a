"""Mail: messages rendered from templates, a transactional outbox, SMTP and console transports."""
