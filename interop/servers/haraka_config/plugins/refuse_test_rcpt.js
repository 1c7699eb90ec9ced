// Refuses the interop suite's refused recipient at RCPT time with a 550 (config/refuse_test_rcpt).
'use strict'

exports.register = function () {
    this.load_list()
}

exports.load_list = function () {
    this.refused = new Set(
        this.config.get('refuse_test_rcpt', 'list', () => this.load_list()).map((a) => a.toLowerCase()),
    )
}

exports.hook_rcpt = function (next, connection, params) {
    const rcpt = params[0]
    const address = `${rcpt.user}@${rcpt.host}`.toLowerCase()
    if (!this.refused.has(address)) return next()
    connection.transaction.results.add(this, { fail: 'refuse_test_rcpt' })
    next(DENY, `5.1.1 ${rcpt.format()}: refused by the interop rig`)
}
