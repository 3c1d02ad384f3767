"""Billing's tables and queries: the only modules with SQL, one per concern.

Statements are written as SQL text (asyncpg `$n` parameters): the pool arithmetic, the COPY
staging insert and the billing-cycle aggregation are single statements whose exact shape
matters, and they read more plainly as SQL than as expression trees.

Callers use the package as one store (`store.get_plan`, `store.Subscription`); the modules
only split it by concern: records (rows, schema names), plans, subscriptions,
allocations, usage, cycle (closing periods and sending invoices), invoices, webhooks.
"""

from services.billing.store.allocations import (
    list_allocations,
    release_allocation,
    reserve_allocation,
)
from services.billing.store.cycle import (
    advance_period,
    bill_unbilled_usage,
    billed_quantity,
    claim_due_subscription,
    claim_invoice_to_send,
    earlier_invoice,
    finish_invoice,
    insert_invoice,
    mark_invoice_sent,
    record_send_failure,
)
from services.billing.store.invoices import (
    apply_invoice_status,
    get_invoice,
    list_invoices,
    lock_invoice_for_stripe,
)
from services.billing.store.plans import (
    all_plans,
    get_plan,
    list_plans,
    set_plan_stripe_price,
)
from services.billing.store.records import (
    DEAD,
    HOBBY,
    Allocation,
    BilledUsage,
    Invoice,
    S,
    Subscription,
    UsageRow,
)
from services.billing.store.subscriptions import (
    NO_ACTIVE_SUBSCRIPTION,
    NO_SUBSCRIPTION,
    apply_stripe_subscription_status,
    cancel_organization,
    change_plan,
    create_default_subscription,
    find_subscription,
    get_subscription,
    get_subscription_by_id,
    has_subscription,
    lock_subscription_by_stripe,
    set_stripe_canceled,
    set_stripe_customer,
    set_stripe_plan_version,
    set_stripe_subscription,
    subscriptions_out_of_step,
)
from services.billing.store.usage import (
    STAGING,
    STAGING_COLUMNS,
    record_usage,
    usage_totals,
)
from services.billing.store.webhooks import (
    finish_webhook_event,
    record_webhook_event,
)

__all__ = [
    "DEAD",
    "HOBBY",
    "NO_ACTIVE_SUBSCRIPTION",
    "NO_SUBSCRIPTION",
    "STAGING",
    "STAGING_COLUMNS",
    "Allocation",
    "BilledUsage",
    "Invoice",
    "S",
    "Subscription",
    "UsageRow",
    "advance_period",
    "all_plans",
    "apply_invoice_status",
    "apply_stripe_subscription_status",
    "bill_unbilled_usage",
    "billed_quantity",
    "cancel_organization",
    "change_plan",
    "claim_due_subscription",
    "claim_invoice_to_send",
    "create_default_subscription",
    "earlier_invoice",
    "find_subscription",
    "finish_invoice",
    "finish_webhook_event",
    "get_invoice",
    "get_plan",
    "get_subscription",
    "get_subscription_by_id",
    "has_subscription",
    "insert_invoice",
    "list_allocations",
    "list_invoices",
    "list_plans",
    "lock_invoice_for_stripe",
    "lock_subscription_by_stripe",
    "mark_invoice_sent",
    "record_send_failure",
    "record_usage",
    "record_webhook_event",
    "release_allocation",
    "reserve_allocation",
    "set_plan_stripe_price",
    "set_stripe_canceled",
    "set_stripe_customer",
    "set_stripe_plan_version",
    "set_stripe_subscription",
    "subscriptions_out_of_step",
    "usage_totals",
]
