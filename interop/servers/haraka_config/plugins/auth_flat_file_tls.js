// auth/flat_file, but AUTH is offered (and accepted) only after STARTTLS, also to loopback clients.
// Stock flat_file offers it in plaintext to private addresses (127.0.0.1 among them) and requires TLS only
// from public ones; the rig wants the behaviour every real client of a public Haraka sees.
'use strict'

exports.register = function () {
    this.inherits('auth/flat_file')
}

exports.hook_capabilities = function (next, connection) {
    if (!connection.tls.enabled) return next()
    this.base['auth/flat_file'].hook_capabilities.call(this, next, connection)
}
